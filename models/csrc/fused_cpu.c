/* Compiled CPU kernels of the DRR-Net training fast paths (loaded by models/cpu_kernels.py).
 *
 * Elementwise and row-wise passes that PyTorch would run as several separate operators, each here one
 * pass over the rows (OpenMP over rows, SIMD along a row). All arrays are row-major float32 (indices
 * int64), contiguous, with the shapes given per function; the Python wrappers check them. The results
 * equal the PyTorch compositions in models/fast_ops.py to fp32 rounding (tests/test_fast_paths.py).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef _OPENMP
static inline int64_t num_threads(void) { return omp_get_max_threads(); }
static inline int64_t thread_num(void) { return omp_get_thread_num(); }
static inline int64_t team_size(void) { return omp_get_num_threads(); }
#else
static inline int64_t num_threads(void) { return 1; }
static inline int64_t thread_num(void) { return 0; }
static inline int64_t team_size(void) { return 1; }
#endif

/* Inside a parallel region: this thread's contiguous share [m0, m1) of n items (balanced within one item). */
static inline void thread_range(int64_t n, int64_t *m0, int64_t *m1) {
    const int64_t t = thread_num(), nt = team_size(), q = n / nt, r = n % nt;
    *m0 = t * q + (t < r ? t : r);
    *m1 = *m0 + q + (t < r);
}

/* With glibc's vector math library (x86_64, linked with -lmvec), sinf / cosf in SIMD loops are its
 * vectorized versions (max error 4 ulp); models/cpu_kernels.py builds without DRR_MVEC when that fails, and
 * then uses PyTorch's PE instead of pe_fwd (scalar sinf would be slower). */
#ifdef DRR_MVEC
#pragma omp declare simd notinbranch
extern float sinf(float);
#pragma omp declare simd notinbranch
extern float cosf(float);
int has_vector_math(void) { return 1; }
#else
int has_vector_math(void) { return 0; }
#endif

/* bfloat16 -> float32 (exact: the bits shifted into the high half). */
static inline float load_bf16(uint16_t x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}

/* float32 -> bfloat16 bits of one value (round to nearest even, NaN -> 0x7FC0; f32_to_bf16's rounding). */
static inline uint16_t store_bf16(float f) {
    union { float f; uint32_t u; } v;
    v.f = f;
    const uint32_t u = v.u;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* RMSNorm without its scale: r[i] = 1 / sqrt(mean_j x[i,j]^2 + eps), xh = x * r.   x, xh (n, D); r (n).
 * (rms_norm_fwd_lp below without the bf16 copy.) */
void rms_norm_fwd_lp(int64_t n, int64_t D, const float *x, float eps, float *xh, uint16_t *xhb, float *r);
void rms_norm_fwd(int64_t n, int64_t D, const float *x, float eps, float *xh, float *r) {
    rms_norm_fwd_lp(n, D, x, eps, xh, NULL, r);
}

/* Backward of rms_norm_fwd, added to gx:  out = gx + r * gxh - (r / D) * sum_j(gxh * xh) * xh.
 * gx, gxh, xh, out (n, D) (out may be gx); r (n). One body for a float32 gxh and (gxh NULL) a bf16 gxhb, a bf16
 * product's result (rms_norm_bwd_lp). */
static void rms_norm_bwd_any(int64_t n, int64_t D, const float *gx, const float *gxh, const uint16_t *gxhb,
                             const float *xh, const float *r, float *out) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *y = xh + i * D, *a = gx + i * D;
        float *o = out + i * D;
        float s = 0.0f;
        if (gxhb) {
            const uint16_t *g = gxhb + i * D;
            #pragma omp simd reduction(+:s)
            for (int64_t j = 0; j < D; j++) s += load_bf16(g[j]) * y[j];
            const float ri = r[i], m = s / (float)D * ri;
            #pragma omp simd
            for (int64_t j = 0; j < D; j++) o[j] = a[j] + (ri * load_bf16(g[j]) - m * y[j]);
        } else {
            const float *g = gxh + i * D;
            #pragma omp simd reduction(+:s)
            for (int64_t j = 0; j < D; j++) s += g[j] * y[j];
            const float ri = r[i], m = s / (float)D * ri;
            #pragma omp simd
            for (int64_t j = 0; j < D; j++) o[j] = a[j] + (ri * g[j] - m * y[j]);
        }
    }
}

void rms_norm_bwd(int64_t n, int64_t D, const float *gx, const float *gxh, const float *xh, const float *r,
                  float *out) {
    rms_norm_bwd_any(n, D, gx, gxh, NULL, xh, r, out);
}

/* ReLU-gated GLU: h = relu(a) * b with ab = [a | b] (n, 2H); h (n, H). Backward: gab = [gh * b * (a > 0) |
 * gh * relu(a)] and the forward's h = relu(a) * b again (so the forward need not keep it); gh, h (n, H); ab,
 * gab (n, 2H). One body for float32 arrays (glu_fwd, glu_bwd) and for bf16 ones (glu_fwd_lp, glu_bwd_lp: a
 * product's result in, the next products' operands out), computing in float32. */
#define F32_ID(x) (x)
#define GLU_FWD(NAME, T, LOAD, STORE)                                                                          \
void NAME(int64_t n, int64_t H, const T *ab, T *h) {                                                            \
    _Pragma("omp parallel for schedule(static)")                                                               \
    for (int64_t i = 0; i < n; i++) {                                                                          \
        const T *a = ab + i * 2 * H, *b = a + H;                                                               \
        T *o = h + i * H;                                                                                      \
        _Pragma("omp simd")                                                                                    \
        for (int64_t j = 0; j < H; j++) {                                                                      \
            const float av = LOAD(a[j]);                                                                       \
            o[j] = STORE((av < 0.0f ? 0.0f : av) * LOAD(b[j]));     /* ReLU: a NaN stays NaN (torch.relu) */   \
        }                                                                                                      \
    }                                                                                                          \
}
#define GLU_BWD(NAME, T, LOAD, STORE)                                                                          \
void NAME(int64_t n, int64_t H, const T *gh, const T *ab, T *gab, T *h) {                                      \
    _Pragma("omp parallel for schedule(static)")                                                               \
    for (int64_t i = 0; i < n; i++) {                                                                          \
        const T *a = ab + i * 2 * H, *b = a + H, *g = gh + i * H;                                              \
        T *ga = gab + i * 2 * H, *gb = ga + H, *o = h + i * H;                                                 \
        _Pragma("omp simd")                                                                                    \
        for (int64_t j = 0; j < H; j++) {                                                                      \
            const float av = LOAD(a[j]), bv = LOAD(b[j]), gv = LOAD(g[j]);                                     \
            const int pos = !(av <= 0.0f);               /* threshold_backward's mask: NaN passes */           \
            ga[j] = STORE(pos ? gv * bv : 0.0f);                                                               \
            gb[j] = STORE(pos ? gv * av : 0.0f);                                                               \
            o[j] = STORE((pos ? av : 0.0f) * bv);                                                              \
        }                                                                                                      \
    }                                                                                                          \
}
GLU_FWD(glu_fwd, float, F32_ID, F32_ID)
GLU_BWD(glu_bwd, float, F32_ID, F32_ID)
GLU_FWD(glu_fwd_lp, uint16_t, load_bf16, store_bf16)
GLU_BWD(glu_bwd_lp, uint16_t, load_bf16, store_bf16)

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
 * bias (nb, H). (bias_relu_lp below, without a bf16 input or copy.) */
void bias_relu_lp(int64_t nb, int64_t n_per, int64_t H, const float *x, const uint16_t *xb, const float *bias,
                  float *out, uint16_t *outb);
void bias_relu(int64_t nb, int64_t n_per, int64_t H, const float *x, const float *bias, float *out) {
    bias_relu_lp(nb, n_per, H, x, NULL, bias, out, NULL);
}

/* Backward of a ReLU whose output is h, with the per-segment column sums of the result (the gradient of the
 * bias added before the ReLU):  out = g * (h > 0);  segsum[b, :] += sum of out's rows of segment b.
 * g, h, out (nb * n_per, H) (out may be g); segsum (nb, H). Each thread takes a fixed range of rows; sums go
 * through float blocks of at most 64 rows into per-thread double partials, which are added in thread order
 * (deterministic for a given thread count). One body for float32 g and for bf16 g (gb, a bf16 product's result;
 * g NULL), with the result also as bf16 into outb (optional: NULL). */
static void relu_bwd_segsum_any(int64_t nb, int64_t n_per, int64_t H, const float *g, const uint16_t *gb,
                                const float *h, float *out, uint16_t *outb, float *segsum) {
    const int64_t n = nb * n_per, NH = nb * H;
    int nt_max = 1;
#ifdef _OPENMP
    nt_max = omp_get_max_threads();
#endif
    double *part = (double *)calloc((size_t)(nt_max * NH), sizeof(double));
    int used = 1;
    #pragma omp parallel
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
        #pragma omp single
        used = omp_get_num_threads();
#endif
        double *acc = part ? part + (int64_t)t * NH : NULL;
        float *blk = (float *)calloc((size_t)H, sizeof(float));
        int64_t cur = -1, cnt = 0;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            const float *hi = h + i * H;
            float *o = out + i * H;
            const int64_t b = i / n_per;
            if (gb) {
                const uint16_t *gi = gb + i * H;
                #pragma omp simd
                for (int64_t j = 0; j < H; j++) o[j] = hi[j] <= 0.0f ? 0.0f : load_bf16(gi[j]);
            } else {
                const float *gi = g + i * H;
                #pragma omp simd
                for (int64_t j = 0; j < H; j++) o[j] = hi[j] <= 0.0f ? 0.0f : gi[j];
            }
            if (outb) {
                uint16_t *ob = outb + i * H;
                #pragma omp simd
                for (int64_t j = 0; j < H; j++) ob[j] = store_bf16(o[j]);
            }
            if (!acc || !blk) {                               /* no scratch memory: atomic adds */
                for (int64_t j = 0; j < H; j++) {
                    #pragma omp atomic
                    segsum[b * H + j] += o[j];
                }
                continue;
            }
            if (b != cur || cnt == 64) {                      /* flush the block into its segment */
                if (cur >= 0)
                    for (int64_t j = 0; j < H; j++) acc[cur * H + j] += (double)blk[j];
                for (int64_t j = 0; j < H; j++) blk[j] = 0.0f;
                cur = b;
                cnt = 0;
            }
            #pragma omp simd
            for (int64_t j = 0; j < H; j++) blk[j] += o[j];
            cnt++;
        }
        if (acc && blk && cur >= 0)
            for (int64_t j = 0; j < H; j++) acc[cur * H + j] += (double)blk[j];
        free(blk);
    }
    if (part) {
        for (int64_t k = 0; k < NH; k++) {
            double s = 0.0;
            for (int t = 0; t < used; t++) s += part[(int64_t)t * NH + k];
            segsum[k] += (float)s;
        }
        free(part);
    }
}

void relu_bwd_segsum(int64_t nb, int64_t n_per, int64_t H, const float *g, const float *h, float *out,
                     float *segsum) {
    relu_bwd_segsum_any(nb, n_per, H, g, NULL, h, out, NULL, segsum);
}

/* Feature-upsampling positional encoding of u (n, C) with K frequencies coeff (K): per channel c the row of
 * x0 (n, C * (2K + inc)) holds [u (when inc)], sin(u * coeff[0..K-1]), cos(u * coeff[0..K-1]).
 * Blocks of PE_ROWS rows: the arguments of a block are laid out contiguously so that one long SIMD loop
 * evaluates the sines and cosines, then they are placed into x0's layout. */
#define PE_ROWS 64
void pe_fwd(int64_t n, int64_t C, int64_t K, int64_t inc, const float *u, const float *coeff, float *x0) {
    const int64_t W = 2 * K + inc, CK = C * K;
    #pragma omp parallel
    {
        float *buf = (float *)malloc((size_t)(3 * PE_ROWS * CK) * sizeof(float));
        float *arg = buf, *sn = buf + PE_ROWS * CK, *cs = buf + 2 * PE_ROWS * CK;
        #pragma omp for schedule(static)
        for (int64_t i0 = 0; i0 < n; i0 += PE_ROWS) {
            const int64_t rows = n - i0 < PE_ROWS ? n - i0 : PE_ROWS, m = rows * C;
            const float *ub = u + i0 * C;
            float *ob = x0 + i0 * C * W;
            if (!buf) {                                       /* no scratch memory: the scalar loop */
                for (int64_t r = 0; r < m; r++) {
                    float *oc = ob + r * W;
                    if (inc) oc[0] = ub[r];
                    for (int64_t k = 0; k < K; k++) {
                        const float a = ub[r] * coeff[k];
                        oc[inc + k] = sinf(a);
                        oc[inc + K + k] = cosf(a);
                    }
                }
                continue;
            }
            for (int64_t r = 0; r < m; r++)                   /* r = row * C + channel */
                for (int64_t k = 0; k < K; k++) arg[r * K + k] = ub[r] * coeff[k];
            #pragma omp simd
            for (int64_t j = 0; j < m * K; j++) {
                sn[j] = sinf(arg[j]);
                cs[j] = cosf(arg[j]);
            }
            for (int64_t r = 0; r < m; r++) {
                float *oc = ob + r * W;
                if (inc) oc[0] = ub[r];
                for (int64_t k = 0; k < K; k++) {
                    oc[inc + k] = sn[r * K + k];
                    oc[inc + K + k] = cs[r * K + k];
                }
            }
        }
        free(buf);
    }
}

/* Backward of pe_fwd from its output x0 (which holds the sines and cosines):
 * gu[i, c] = sum_k coeff[k] * (g[sin_k] * cos_k - g[cos_k] * sin_k) (+ g[u] when inc), with g = g1 + g2
 * (g2 may be NULL).   g1, g2, x0 (n, C * (2K + inc)); gu (n, C). */
void pe_bwd(int64_t n, int64_t C, int64_t K, int64_t inc, const float *g1, const float *g2, const float *x0,
            const float *coeff, float *gu) {
    const int64_t W = 2 * K + inc, m = n * C;
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < m; r++) {                         /* r = row * C + channel */
        const float *a = g1 + r * W, *x = x0 + r * W;
        float acc = 0.0f;
        if (g2) {
            const float *b = g2 + r * W;
            for (int64_t k = 0; k < K; k++)
                acc += ((a[inc + k] + b[inc + k]) * x[inc + K + k] - (a[inc + K + k] + b[inc + K + k]) * x[inc + k])
                       * coeff[k];
            if (inc) acc += a[0] + b[0];
        } else {
            for (int64_t k = 0; k < K; k++)
                acc += (a[inc + k] * x[inc + K + k] - a[inc + K + k] * x[inc + k]) * coeff[k];
            if (inc) acc += a[0];
        }
        gu[r] = acc;
    }
}

/* Corner stencil of grid_sample(bilinear, align_corners=True, padding zeros) on a lattice of array shape
 * shape[0..d-1] (C order) at points x (M, d), column d-1-a = coordinate of array axis a:
 * per axis f = ((x + 1) / 2) * (n - 1) clamped to [-2, n + 1], i0 = floor(f), t = f - i0, corner weights
 * (1 - t) and t, times 0 for a corner outside [0, n - 1] (whose index is clamped into it). Corners are
 * enumerated with the first array axis slowest; weights multiply in axis order. idx (M, 2^d) flat rows,
 * w (M, 2^d). Same operations, in the same order, as models/fast_ops.corner_stencil's PyTorch version. */
void corner_stencil(int64_t M, int64_t d, const int64_t *shape, const float *x, int64_t *idx, float *w) {
    const int64_t K = (int64_t)1 << d;
    int64_t stride[16];
    stride[d - 1] = 1;
    for (int64_t a = d - 2; a >= 0; a--) stride[a] = stride[a + 1] * shape[a + 1];
    #pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        int64_t ia[16][2];
        float wa[16][2];
        for (int64_t a = 0; a < d; a++) {
            const int64_t n = shape[a];
            float f = ((x[m * d + (d - 1 - a)] + 1.0f) / 2.0f) * (float)(n - 1);
            if (f < -2.0f) f = -2.0f;
            if (f > (float)(n + 1)) f = (float)(n + 1);
            const float fl = floorf(f), t = f - fl;
            const int64_t i0 = isnan(fl) ? -2 : (int64_t)fl, i1 = i0 + 1;
            wa[a][0] = (1.0f - t) * (float)(i0 >= 0 && i0 <= n - 1);
            wa[a][1] = t * (float)(i1 >= 0 && i1 <= n - 1);
            ia[a][0] = (i0 < 0 ? 0 : (i0 > n - 1 ? n - 1 : i0)) * stride[a];
            ia[a][1] = (i1 < 0 ? 0 : (i1 > n - 1 ? n - 1 : i1)) * stride[a];
        }
        for (int64_t c = 0; c < K; c++) {
            int64_t r = 0;
            float wc = 1.0f;
            for (int64_t a = 0; a < d; a++) {
                const int bit = (int)((c >> (d - 1 - a)) & 1);
                r += ia[a][bit];
                wc = a == 0 ? wa[a][bit] : wc * wa[a][bit];
            }
            idx[m * K + c] = r;
            w[m * K + c] = wc;
        }
    }
}

/* mask[p] = 1 for every row p = idx[m, k] with w[m, k] != 0 (mask (P) zeroed first); returns how many. */
int64_t mark_touched(int64_t MK, const int64_t *idx, const float *w, int64_t P, uint8_t *mask) {
    for (int64_t p = 0; p < P; p++) mask[p] = 0;
    for (int64_t j = 0; j < MK; j++)
        if (w[j] != 0.0f) mask[idx[j]] = 1;
    int64_t u = 0;
    for (int64_t p = 0; p < P; p++) u += mask[p];
    return u;
}

/* float32 -> bfloat16 with round-to-nearest-even (NaN -> 0x7FC0): the same bits as PyTorch's conversion.
 * src (n) float32, dst (n) bf16 bit patterns. One pass (vectorized integer arithmetic). */
void f32_to_bf16(int64_t n, const float *src, uint16_t *dst) {
    #pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) dst[i] = store_bf16(src[i]);
}

/* src (n) bf16 bits, dst (n) float32. */
void bf16_to_f32(int64_t n, const uint16_t *src, float *dst) {
    #pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) dst[i] = load_bf16(src[i]);
}

/* bf16 training (models/fast_ops.py, train.mixed_precision: bf16): the passes around a bf16 matrix product
 * read its bf16 result and write its bf16 operands themselves, instead of separate conversion passes. Each
 * computes in float32 what its float32 twin computes on the same (bf16-valued) inputs (the same body where the
 * twin calls it; elementwise the same bits, row sums to float32 rounding) and rounds only what becomes a
 * product's operand. */

/* rms_norm_fwd, with xh also as bf16 (xhb: the next product's operand; NULL: none). */
void rms_norm_fwd_lp(int64_t n, int64_t D, const float *x, float eps, float *xh, uint16_t *xhb, float *r) {
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
        if (xhb) {
            uint16_t *ob = xhb + i * D;
            #pragma omp simd
            for (int64_t j = 0; j < D; j++) ob[j] = store_bf16(o[j]);
        }
    }
}

/* rms_norm_bwd with gxh a bf16 product's result. */
void rms_norm_bwd_lp(int64_t n, int64_t D, const float *gx, const uint16_t *gxh, const float *xh, const float *r,
                     float *out) {
    rms_norm_bwd_any(n, D, gx, NULL, gxh, xh, r, out);
}

/* out = a + b for a float32, b a bf16 product's result (n values; out may be a). */
void add_bf16(int64_t n, const float *a, const uint16_t *b, float *out) {
    #pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + load_bf16(b[i]);
}

/* out = bf16(a + b), a and b float32 (n values): a sum that is only a product's operand. */
void add_to_bf16(int64_t n, const float *a, const float *b, uint16_t *out) {
    #pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) out[i] = store_bf16(a[i] + b[i]);
}

/* relu_bwd_segsum of a bf16 g (a product's result), the result also as bf16 into outb (optional: 0). */
void relu_bwd_segsum_lp(int64_t nb, int64_t n_per, int64_t H, const uint16_t *g, const float *h, float *out,
                        uint16_t *outb, float *segsum) {
    relu_bwd_segsum_any(nb, n_per, H, NULL, g, h, out, outb, segsum);
}

/* bias_relu of a float32 x or (x NULL) a bf16 xb (a product's result), with the result also as bf16 into outb
 * (optional: 0; the next product's operand). */
void bias_relu_lp(int64_t nb, int64_t n_per, int64_t H, const float *x, const uint16_t *xb, const float *bias,
                  float *out, uint16_t *outb) {
    const int64_t n = nb * n_per;
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *b = bias + (i / n_per) * H;
        float *o = out + i * H;
        if (xb) {
            const uint16_t *xi = xb + i * H;
            #pragma omp simd
            for (int64_t j = 0; j < H; j++) {
                const float v = load_bf16(xi[j]) + b[j];
                o[j] = v < 0.0f ? 0.0f : v;
            }
        } else {
            const float *xi = x + i * H;
            #pragma omp simd
            for (int64_t j = 0; j < H; j++) {
                const float v = xi[j] + b[j];
                o[j] = v < 0.0f ? 0.0f : v;
            }
        }
        if (outb) {
            uint16_t *ob = outb + i * H;
            #pragma omp simd
            for (int64_t j = 0; j < H; j++) ob[j] = store_bf16(o[j]);
        }
    }
}

/* Baked inference on a query lattice (models/fast_ops.GridQuery.gather_bias_relu, DRRNet.predict_grid):
 * for the query vertices start .. start+M-1 (C-order flat indices of a query lattice with strides
 * qstrides[0..d-1]), out[m, :] = relu(sum_k w_k * table[r_k, :] + bias) where the corners (r_k, w_k) come
 * from per-axis tables: axis a contributes ka[a] (1 or 2) flat-row offsets axis_idx[a][j * ka[a] + b] and
 * weights axis_w[a][j * ka[a] + b] at its query index j. Corners are enumerated with the first axis slowest,
 * rows add up and weights multiply in axis order, corners are added in order k = 0..K-1, then the bias, then
 * the ReLU: the same operations in the same order as GridQuery.stencil + gather_corners + add + relu (so the
 * same bits), without materializing the stencil. table (P, C); bias (C); out (M, C). At most 2^8 corners.
 * One body for two table types: float32, and bfloat16 rows (half the bytes of a memory-bound gather) read as
 * float32 (exact: the bits shifted up) and accumulated in float32 in the same order. GATHER_ROW defines the
 * one-vertex body, GRID_GATHER_BIAS_RELU the kernel over rows (baked_mlp below has a vector twin of GATHER_ROW,
 * MLP_GATHER_ROW, for hidden widths that are multiples of its vectors). Lattices of at most 64 axes. */
/* The query lattice's multi-index j[0..d) of flat vertex v (C order, strides qstrides). */
static inline void unravel(int64_t v, int64_t d, const int64_t *qstrides, int64_t *j) {
    for (int64_t a = 0; a < d; a++) {
        j[a] = v / qstrides[a];
        v -= j[a] * qstrides[a];
    }
}

/* j <- the multi-index of the next vertex in C order (axis a has qstrides[a-1] / qstrides[a] vertices). */
static inline void next_vertex(int64_t d, const int64_t *qstrides, int64_t *j) {
    for (int64_t a = d - 1; a > 0; a--) {
        if (++j[a] * qstrides[a] < qstrides[a - 1]) return;
        j[a] = 0;
    }
    j[0]++;
}

/* The corners of the query vertex with multi-index j: rows cr[0..n) and weights cw[0..n) (returns n). */
static inline int64_t vertex_corners(const int64_t *j, int64_t d, const int64_t *ka, const int64_t *const *axis_idx,
                                     const float *const *axis_w, int64_t *cr, float *cw) {
    int64_t n = 1;
    cr[0] = 0;
    cw[0] = 1.0f;                               /* 1 * w exactly w: the first axis' weight */
    for (int64_t a = 0; a < d; a++) {
        const int64_t k = ka[a];
        const int64_t *ia = axis_idx[a] + j[a] * k;
        const float *wa = axis_w[a] + j[a] * k;
        for (int64_t p = n - 1; p >= 0; p--) {  /* expand in place, back to front */
            const int64_t r0 = cr[p];
            const float w0 = cw[p];
            for (int64_t b = k - 1; b >= 0; b--) {
                cr[p * k + b] = r0 + ia[b];
                cw[p * k + b] = a == 0 ? wa[b] : w0 * wa[b];
            }
        }
        n *= k;
    }
    return n;
}

/* One query vertex (multi-index j): o = relu(sum_q w_q table[r_q] + bias) (without the ReLU: relu 0). */
#define GATHER_ROW(NAME, TTYPE, LOAD)                                                                            \
static inline void NAME(const int64_t *j, int64_t d, const int64_t *ka, const int64_t *const *axis_idx,         \
                        const float *const *axis_w, int64_t C, const TTYPE *table, const float *bias,           \
                        int64_t relu, float *o) {                                                               \
    int64_t cr[256];                                                                                           \
    float cw[256];                                                                                             \
    const int64_t n = vertex_corners(j, d, ka, axis_idx, axis_w, cr, cw);                                      \
    _Pragma("omp simd")                                                                                        \
    for (int64_t c = 0; c < C; c++) o[c] = 0.0f;                                                               \
    for (int64_t q = 0; q < n; q++) {                                                                          \
        const float wq = cw[q];                                                                                \
        const TTYPE *t = table + cr[q] * C;                                                                    \
        _Pragma("omp simd")                                                                                    \
        for (int64_t c = 0; c < C; c++) o[c] += wq * LOAD(t[c]);                                               \
    }                                                                                                          \
    _Pragma("omp simd")                                                                                        \
    for (int64_t c = 0; c < C; c++) {                                                                          \
        const float x = o[c] + bias[c];                                                                        \
        o[c] = x < 0.0f && relu ? 0.0f : x;                                                                    \
    }                                                                                                          \
}

/* Ask for the table rows of the query vertex with multi-index j to come into the L2 cache (row_bytes each). */
static inline void prefetch_vertex(const int64_t *j, int64_t d, const int64_t *ka, const int64_t *const *axis_idx,
                                   const float *const *axis_w, const char *table, int64_t row_bytes) {
    int64_t cr[256];
    float cw[256];
    const int64_t n = vertex_corners(j, d, ka, axis_idx, axis_w, cr, cw);
    for (int64_t q = 0; q < n; q++)
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(table + cr[q] * row_bytes + b, 0, 2);
}

#define GRID_GATHER_BIAS_RELU(NAME, ROW, TTYPE)                                                                  \
void NAME(int64_t start, int64_t M, int64_t d, const int64_t *qstrides, const int64_t *ka,                    \
          const int64_t *const *axis_idx, const float *const *axis_w, int64_t C,                              \
          const TTYPE *table, const float *bias, int64_t relu, float *out) {                                  \
    _Pragma("omp parallel")                                                                                    \
    {                                                                                                          \
        int64_t m0, m1, j[64];                          /* this thread's rows, as omp for schedule(static) */  \
        thread_range(M, &m0, &m1);                                                                             \
        unravel(start + m0, d, qstrides, j);                                                                   \
        for (int64_t m = m0; m < m1; m++, next_vertex(d, qstrides, j))                                         \
            ROW(j, d, ka, axis_idx, axis_w, C, table, bias, relu, out + m * C);                                \
    }                                                                                                          \
}

#define LOAD_F32(x) (x)
GATHER_ROW(gather_row_f32, float, LOAD_F32)
GATHER_ROW(gather_row_bf16t, uint16_t, load_bf16)
GRID_GATHER_BIAS_RELU(grid_gather_bias_relu, gather_row_f32, float)
GRID_GATHER_BIAS_RELU(grid_gather_bias_relu_bf16t, gather_row_bf16t, uint16_t)

/* ------------------------------------------------------------------------------------------------------
 * Baked inference in one pass per block of query vertices (DRRNet.predict_grid, CPU float32), for K members
 * (condition biases bias0[k], results out[k * M + m]) whose rows are gathered once per block:
 *   h_0 = relu(gather(table) + bias0[k])         (MLP_GATHER_ROW: the rows, interpolated, + the condition bias)
 *   h_l = relu(h_{l-1} W_l^T + b_l), l = 1..L    (L hidden layers, H x H)
 *   out = h_L . w_out + b_out                    (the output layer, one channel)
 * A block of MLP_MB vertices stays in the thread's caches from the gather to the output (no pass of a
 * (rows, H) activation through memory), and the hidden products run in a register-blocked micro-kernel:
 * MLP_MR rows x MLP_NR columns of accumulators, the weights packed in panels of MLP_NR columns
 * (packed[l][p][k][j] = W_l[p * MLP_NR + j][k], DRRNet side: cpu_kernels.pack_panels). Each output value is
 * sum_k (in k order, fused multiply-adds) then + bias, then the ReLU: the same operations for every row,
 * whatever its block, thread, the chunking or the number of members (values repeat bitwise; they differ from
 * oneDNN's / MKL's products by the summation order only). H must be a multiple of MLP_NR (mlp_panel_width()).
 * ------------------------------------------------------------------------------------------------------ */
#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512 vf_t;
#define MLP_VW 16
#define MLP_MR 12
#define V_LOAD(p) _mm512_loadu_ps(p)
#define V_STORE(p, v) _mm512_storeu_ps(p, v)
#define V_SET1(x) _mm512_set1_ps(x)
#define V_ZERO() _mm512_setzero_ps()
#define V_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define V_ADD(a, b) _mm512_add_ps(a, b)
#define V_MUL(a, b) _mm512_mul_ps(a, b)
#define V_LOAD_BF16(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(                            \
                                            _mm256_loadu_si256((const __m256i *)(p))), 16))
#define V_RELU(a) _mm512_max_ps(_mm512_setzero_ps(), a)     /* NaN, -0: a (2nd operand), as torch.relu */
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
typedef __m256 vf_t;
#define MLP_VW 8
#define MLP_MR 6
#define V_LOAD(p) _mm256_loadu_ps(p)
#define V_STORE(p, v) _mm256_storeu_ps(p, v)
#define V_SET1(x) _mm256_set1_ps(x)
#define V_ZERO() _mm256_setzero_ps()
#define V_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define V_ADD(a, b) _mm256_add_ps(a, b)
#define V_MUL(a, b) _mm256_mul_ps(a, b)
#define V_LOAD_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(                            \
                                            _mm_loadu_si128((const __m128i *)(p))), 16))
#define V_RELU(a) _mm256_max_ps(_mm256_setzero_ps(), a)     /* NaN, -0: a (2nd operand), as torch.relu */
#else
typedef struct { float x[4]; } vf_t;                       /* portable: 4 lanes, fmaf per lane */
#define MLP_VW 4
#define MLP_MR 4
static inline vf_t v_load(const float *p) { vf_t v; for (int i = 0; i < 4; i++) v.x[i] = p[i]; return v; }
static inline void v_store(float *p, vf_t v) { for (int i = 0; i < 4; i++) p[i] = v.x[i]; }
static inline vf_t v_set1(float a) { vf_t v; for (int i = 0; i < 4; i++) v.x[i] = a; return v; }
static inline vf_t v_fma(vf_t a, vf_t b, vf_t c) {
    for (int i = 0; i < 4; i++) c.x[i] = fmaf(a.x[i], b.x[i], c.x[i]);
    return c;
}
static inline vf_t v_add(vf_t a, vf_t b) { for (int i = 0; i < 4; i++) a.x[i] += b.x[i]; return a; }
static inline vf_t v_mul(vf_t a, vf_t b) { for (int i = 0; i < 4; i++) a.x[i] *= b.x[i]; return a; }
static inline vf_t v_load_bf16(const uint16_t *p) {
    vf_t v;
    for (int i = 0; i < 4; i++) v.x[i] = load_bf16(p[i]);
    return v;
}
static inline vf_t v_relu(vf_t a) { for (int i = 0; i < 4; i++) a.x[i] = a.x[i] < 0.0f ? 0.0f : a.x[i]; return a; }
#define V_LOAD(p) v_load(p)
#define V_STORE(p, v) v_store(p, v)
#define V_SET1(x) v_set1(x)
#define V_ZERO() v_set1(0.0f)
#define V_FMA(a, b, c) v_fma(a, b, c)
#define V_ADD(a, b) v_add(a, b)
#define V_MUL(a, b) v_mul(a, b)
#define V_LOAD_BF16(p) v_load_bf16(p)
#define V_RELU(a) v_relu(a)
#endif
#define MLP_NR (2 * MLP_VW)          /* columns per panel: two vectors */
#define MLP_MB (8 * MLP_MR)          /* rows per block */

int64_t mlp_panel_width(void) { return MLP_NR; }

/* c[r, 0..NR) = relu(a[r, :K] . panel[:, 0..NR) + bias[0..NR)) for MLP_MR rows of a (row stride lda); the
   accumulators are named variables (FOR_ROWS), which keeps all 2 * MLP_MR of them in registers. */
#if MLP_MR == 12
#define FOR_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#elif MLP_MR == 6
#define FOR_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#else
#define FOR_ROWS(X) X(0) X(1) X(2) X(3)
#endif
#define TILE_DECL(r) vf_t s##r##_0 = V_ZERO(), s##r##_1 = V_ZERO();
#define TILE_FMA(r) { const vf_t x = V_SET1(a[r * lda + k]);                                                  \
                      s##r##_0 = V_FMA(x, b0, s##r##_0); s##r##_1 = V_FMA(x, b1, s##r##_1); }
#define TILE_STORE(r) V_STORE(c + r * ldc, V_RELU(V_ADD(s##r##_0, bb0)));                                      \
                      V_STORE(c + r * ldc + MLP_VW, V_RELU(V_ADD(s##r##_1, bb1)));
static inline void mlp_tile(const float *a, int64_t lda, const float *panel, int64_t K, const float *bias,
                            float *c, int64_t ldc) {
    FOR_ROWS(TILE_DECL)
    for (int64_t k = 0; k < K; k++) {
        const vf_t b0 = V_LOAD(panel + k * MLP_NR), b1 = V_LOAD(panel + k * MLP_NR + MLP_VW);
        FOR_ROWS(TILE_FMA)
    }
    const vf_t bb0 = V_LOAD(bias), bb1 = V_LOAD(bias + MLP_VW);
    FOR_ROWS(TILE_STORE)
}

/* GATHER_ROW's relu(sum_q w_q table[r_q] + bias) (the same operations in the same order, so the same values), or
   with bias NULL the sum alone (the bias and the ReLU then follow per member in mlp_bias_relu: the same values
   again), in vectors of MLP_VW along the row, the corner sum in registers; one corner of weight 1 (a query vertex
   on a lattice vertex) reads the row directly (0 + 1 * x = x but for a -0, which the ReLU after the bias makes 0
   either way). */
#define MLP_GATHER_ROW(NAME, TTYPE, VLOADT)                                                                      \
static inline void NAME(const int64_t *j, int64_t d, const int64_t *ka, const int64_t *const *axis_idx,         \
                        const float *const *axis_w, int64_t H, const TTYPE *table, const float *bias,           \
                        float *o) {                                                                             \
    int64_t cr[256];                                                                                           \
    float cw[256];                                                                                             \
    const int64_t n = vertex_corners(j, d, ka, axis_idx, axis_w, cr, cw);                                      \
    for (int64_t c = 0; c < H; c += MLP_VW) {                                                                  \
        vf_t acc;                                                                                              \
        if (n == 1 && cw[0] == 1.0f) acc = VLOADT(table + cr[0] * H + c);                                      \
        else {                                                                                                 \
            acc = V_ZERO();                                                                                    \
            for (int64_t q = 0; q < n; q++)                                                                    \
                acc = V_ADD(acc, V_MUL(V_SET1(cw[q]), VLOADT(table + cr[q] * H + c)));                         \
        }                                                                                                      \
        V_STORE(o + c, bias ? V_RELU(V_ADD(acc, V_LOAD(bias + c))) : acc);                                     \
    }                                                                                                          \
}
MLP_GATHER_ROW(mlp_gather_row_f32, float, V_LOAD)
MLP_GATHER_ROW(mlp_gather_row_bf16t, uint16_t, V_LOAD_BF16)

/* The same with bf16 in and out (a bf16 table, bias and result: the products' operands of bf16 inference):
 * out = bf16(relu(float(bf16(sum_q w_q table[r_q])) + float(bias))): the corner sum in float32 in GATHER_ROW's
 * order, rounded to bf16 (the rows a bf16 keep_rows resamples), then the bias added in float32 and rounded (as
 * PyTorch adds two bf16 tensors), so rows resampled once and then biased give the same bits as this pass. */
int64_t grid_gather_bias_relu_lp(int64_t start, int64_t M, int64_t d, const int64_t *qstrides, const int64_t *ka,
                                 const int64_t *const *axis_idx, const float *const *axis_w, int64_t C,
                                 const uint16_t *table, const uint16_t *bias, int64_t relu, uint16_t *out) {
    float *rowbuf = (float *)malloc((size_t)(num_threads() * 2 * C) * sizeof(float));   /* per thread: a row */
    if (rowbuf == NULL) return 1;                                                           /* and zeros */
    #pragma omp parallel
    {
        int64_t m0, m1, j[64];
        float *o = rowbuf + thread_num() * 2 * C, *zero = o + C;
        for (int64_t c = 0; c < C; c++) zero[c] = 0.0f;
        thread_range(M, &m0, &m1);
        unravel(start + m0, d, qstrides, j);
        for (int64_t m = m0; m < m1; m++, next_vertex(d, qstrides, j)) {
            if (C % MLP_VW == 0) mlp_gather_row_bf16t(j, d, ka, axis_idx, axis_w, C, table, NULL, o);  /* the sum */
            else gather_row_bf16t(j, d, ka, axis_idx, axis_w, C, table, zero, 0, o);                 /* (+ 0) */
            uint16_t *ob = out + m * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                const float x = load_bf16(store_bf16(o[c])) + load_bf16(bias[c]);
                ob[c] = store_bf16(x < 0.0f && relu ? 0.0f : x);
            }
        }
    }
    free(rowbuf);
    return 0;
}

/* h[r, :] = relu(x[r, :] + bias) for rows r < n (H a multiple of MLP_VW). */
static inline void mlp_bias_relu(int64_t n, int64_t H, const float *x, const float *bias, float *h) {
    for (int64_t r = 0; r < n; r++)
        for (int64_t c = 0; c < H; c += MLP_VW)
            V_STORE(h + r * H + c, V_RELU(V_ADD(V_LOAD(x + r * H + c), V_LOAD(bias + c))));
}

/* The condition part of a baked model's fusion pre-activation, from its folded condition lines
 * (DRRNet._fold_condition): out[b] = bias + sum over lines j, in order, of lerp(A_j, c[b, param[j]]), line j the rows
 * offset[j] .. offset[j] + length[j] - 1 of tables (., H), lerp as models.components.grids.lerp_lines (clamp):
 * s = clamp(t, 0, 1) (n - 1), i0 = min(floor(s), n - 2), w = s - i0, v0 + w (v1 - v0). Float operations one by
 * one (ISO C: no contraction), so the same bits as those operations in PyTorch (DRRNet._cond_bias_folded).
 * Returns -2 where a line is not inside the table's rows or parameters, -1 where a condition is NaN (nothing
 * written), else 0. */
int64_t cond_bias_lines(int64_t B, int64_t dc, const float *c, int64_t nlines, const int64_t *param,
                        const int64_t *offset, const int64_t *length, int64_t rows, const float *tables,
                        int64_t H, const float *bias, float *out) {
    for (int64_t j = 0; j < nlines; j++)                                /* lines inside the table: else -2 */
        if (param[j] < 0 || param[j] >= dc || length[j] < 2 || offset[j] < 0 || offset[j] > rows - length[j])
            return -2;
    for (int64_t i = 0; i < B * dc; i++)
        if (c[i] != c[i]) return -1;                                   /* a NaN condition: nothing written */
    for (int64_t b = 0; b < B; b++) {
        float *o = out + b * H;
        for (int64_t h = 0; h < H; h++) o[h] = bias[h];
        for (int64_t j = 0; j < nlines; j++) {
            const float t = c[b * dc + param[j]], n1 = (float)(length[j] - 1);
            const float s = (t < 0.0f ? 0.0f : t > 1.0f ? 1.0f : t) * n1;
            const float f = floorf(s);
            const int64_t i0 = f > (float)(length[j] - 2) ? length[j] - 2 : (int64_t)f;
            const float w = s - (float)i0;
            const float *v0 = tables + (offset[j] + i0) * H, *v1 = v0 + H;
            for (int64_t h = 0; h < H; h++) {
                const float d = v1[h] - v0[h], m = w * d, l = v0[h] + m;
                o[h] = o[h] + l;
            }
        }
    }
    return 0;
}

#define BAKED_MLP(NAME, ROW, TTYPE)                                                                              \
int64_t NAME(int64_t start, int64_t M, int64_t d, const int64_t *qstrides, const int64_t *ka,                 \
             const int64_t *const *axis_idx, const float *const *axis_w, int64_t H, const TTYPE *table,       \
             int64_t K, const float *bias0, int64_t L, const float *packed, const float *hbias,                \
             const float *w_out, float b_out, float *out) {                                                   \
    const int64_t nblk = (M + MLP_MB - 1) / MLP_MB, panels = H / MLP_NR;                                       \
    const int64_t per_thread = 3 * MLP_MB * H;     /* floats: the block's rows + two activation blocks */     \
    float *bufs = (float *)aligned_alloc(64, (size_t)(num_threads() * per_thread) * sizeof(float));           \
    if (bufs == NULL) return 1;                                                                                \
    _Pragma("omp parallel")                                                                                    \
    {                                                                                                          \
        float *raw = bufs + thread_num() * per_thread, *buf = raw + MLP_MB * H;                                \
        int64_t b0, b1, j[64], jp[64];                        /* this thread's blocks; vertex / prefetch index */ \
        thread_range(nblk, &b0, &b1);                                                                          \
        unravel(start + b0 * MLP_MB, d, qstrides, j);                                                          \
        unravel(start + b0 * MLP_MB, d, qstrides, jp);                                                         \
        int64_t pf = b0 * MLP_MB;                             /* next vertex to prefetch */                    \
        for (int64_t blk = b0; blk < b1; blk++) {                                                              \
            const int64_t r0 = blk * MLP_MB, rows = M - r0 < MLP_MB ? M - r0 : MLP_MB;                         \
            const int64_t padded = (rows + MLP_MR - 1) / MLP_MR * MLP_MR;                                      \
            /* the rows, once per block: one member takes relu(rows + bias) at once, several the rows */       \
            float *dst = K == 1 ? buf : raw;                                                                   \
            for (int64_t m = 0; m < rows; m++, next_vertex(d, qstrides, j))                                    \
                ROW(j, d, ka, axis_idx, axis_w, H, table, K == 1 ? bias0 : NULL, dst + m * H);                 \
            for (int64_t x = rows * H; x < padded * H; x++) dst[x] = 0.0f;   /* rows past the end */           \
            /* the next block's table rows are fetched while this block's products run (spread over the   */ \
            /* first layer's tiles): its gather then reads the caches, not memory                          */ \
            const int64_t pf_end = b1 * MLP_MB < r0 + 2 * MLP_MB ? (M < b1 * MLP_MB ? M : b1 * MLP_MB)         \
                                                                  : r0 + 2 * MLP_MB;                           \
            for (; pf < r0 + MLP_MB; pf++) next_vertex(d, qstrides, jp);  /* (the first block: unfetched) */   \
            const int64_t pf_step = (MLP_MB + panels * (padded / MLP_MR) - 1) / (panels * (padded / MLP_MR)); \
            for (int64_t k = 0; k < K; k++) {                 /* each member: its bias, the decoder */         \
                float *hin = buf, *hout = buf + MLP_MB * H;                                                    \
                if (K > 1) mlp_bias_relu(padded, H, raw, bias0 + k * H, hin);                                  \
                for (int64_t l = 0; l < L; l++) {                                                              \
                    const float *wl = packed + l * H * H, *bl = hbias + l * H;                                 \
                    for (int64_t p = 0; p < panels; p++)                                                       \
                        for (int64_t t = 0; t < padded; t += MLP_MR) {                                         \
                            mlp_tile(hin + t * H, H, wl + p * H * MLP_NR, H, bl + p * MLP_NR,                  \
                                     hout + t * H + p * MLP_NR, H);                                            \
                            for (int64_t i = 0; i < pf_step && pf < pf_end; i++, pf++,                         \
                                 next_vertex(d, qstrides, jp))                                                 \
                                prefetch_vertex(jp, d, ka, axis_idx, axis_w, (const char *)table,              \
                                                H * (int64_t)sizeof(TTYPE));                                   \
                        }                                                                                      \
                    float *sw = hin; hin = hout; hout = sw;                                                    \
                }                                                                                              \
                for (int64_t m = 0; m < rows; m++) {                                                           \
                    const float *h = hin + m * H;                                                              \
                    vf_t acc = V_ZERO();                                                                       \
                    for (int64_t c = 0; c < H; c += MLP_VW) acc = V_FMA(V_LOAD(h + c), V_LOAD(w_out + c), acc); \
                    float lane[MLP_VW], s = 0.0f;                                                              \
                    V_STORE(lane, acc);                                                                        \
                    for (int i = 0; i < MLP_VW; i++) s += lane[i];                                             \
                    out[k * M + r0 + m] = s + b_out;                                                           \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    free(bufs);                                                                                                \
    return 0;                                                                                                  \
}

BAKED_MLP(baked_mlp, mlp_gather_row_f32, float)
BAKED_MLP(baked_mlp_bf16t, mlp_gather_row_bf16t, uint16_t)

/* ------------------------------------------------------------------------------------------------------
 * Baked inference with bf16 products on AMX tiles (DRRNet.predict_grid(dtype=torch.bfloat16) on a CPU with
 * AMX-BF16): rows (M, H) bf16 (the table's rows of the query vertices, read in order: the identity lattice or
 * rows resampled once), then per block of AMX_MB rows in the thread's caches and per member k of K:
 *   h_0 = relu(rows + bias0[k]), rounded to bf16   (bias0 (K, H) float32; out[k * M + m])
 *   h_l = relu(b_l + h_{l-1} W_l^T): bf16 x bf16 products accumulated in float32 on the tiles, starting at the
 *         bias; the ReLU, and the rounding to bf16 as the next layer's operand (the ReLU applied to the bf16
 *         bits, the same values); the last hidden layer stays float32
 *   out = act(h_L . w_out + b_out)              (float32; act the model's output activation, 16 rows at a time)
 * Where the time goes (2-core Xeon with AMX, H = 128, two hidden layers): the tile products, their tile loads
 * (the weights come from L2: both layers' 64 KB do not stay in L1) and stores, and the vector passes (h_0,
 * ReLU / bf16, output layer) do not overlap on the core: each costs its own time.
 * packed[l] holds W_l in the tiles' pair layout (cpu_kernels.pack_amx): for each 32-wide block kb of inputs and
 * 16-wide block nb of outputs a 1 KB tile, packed[l][kb][nb][r][n][p] = W_l[nb * 16 + n][kb * 32 + 2 r + p].
 * H must be a multiple of 32. Returns 0, or -1 where the library has no AMX code or the kernel refuses the
 * process the AMX state (then the caller uses the PyTorch products). Rows of a block do not interact and every
 * row runs the same operations: values do not depend on the chunking or the thread count.
 * ------------------------------------------------------------------------------------------------------ */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512F__) && \
    defined(__linux__)                            /* (AVX-512: the V_* macros above are its 16-lane ones) */
#include <sys/syscall.h>
long syscall(long number, ...);                    /* unistd.h declares it only outside strict C11 */
#define AMX_MB 32                                  /* rows per block: two 16-row tiles */
#define AMX_PF_AHEAD 4                             /* blocks between the rows prefetched and those in use */

static int amx_state = 0;                          /* 0 unknown, 1 granted, -1 refused */

static int amx_granted(void) {
    if (amx_state == 0) {
        #pragma omp critical(drr_amx)
        if (amx_state == 0)   /* ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18) */
            amx_state = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
    }
    return amx_state == 1;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config_t;

/* 32 float32 -> bf16 (round to nearest even), then the ReLU on the bf16 bits: as int16, the negative values
 * -0 .. -inf are -32768 .. -128 and become 0, the negative NaNs (-127 .. -1) stay, as torch.relu keeps a NaN: the
 * same values as the ReLU in float32 before the rounding (a -0 becomes +0). */
static inline void store32_relu_bf16(uint16_t *dst, __m512 lo, __m512 hi) {
    const __m512i b = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
    _mm512_storeu_si512(dst, _mm512_maskz_mov_epi16(_mm512_cmpgt_epi16_mask(b, _mm512_set1_epi16(-128)), b));
}

/* The model's output activation in 16 lanes: act 0 none, 1 sigmoid, 2 clamp to [0, 1]; a NaN stays NaN.
 * sigmoid(x) = 1 / (1 + e^-x), e^t = 2^n p(r) with n = round(t / ln 2), r = t - n ln 2 (ln 2 in two parts, so r is
 * exact) in [-ln 2 / 2, ln 2 / 2] and p its Taylor polynomial of degree 7 (truncation < 3e-9 relative): within
 * 2 float32 ulp of PyTorch's sigmoid (tests/test_cpu_kernels.py). t is clamped to [-104, 104]: beyond, the sigmoid
 * is 1 (e^t 0) or 0 (e^t overflows to inf) in float32 anyway. */
static inline __m512 amx_activation(__m512 x, int64_t act) {
    if (act == 2)
        return _mm512_min_ps(_mm512_set1_ps(1.0f), _mm512_max_ps(_mm512_setzero_ps(), x));  /* NaN: 2nd operand */
    if (act != 1)
        return x;
    const __m512 t = _mm512_min_ps(_mm512_set1_ps(104.0f),
                                   _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_sub_ps(_mm512_setzero_ps(), x)));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), t);           /* ln 2, high part */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860676533018e-06f), r);             /* and the rest */
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, _mm512_scalef_ps(p, n)));
}

/* One thread's blocks [b0, b1) of baked_mlp_amx; always inlined, so that the width H is a constant where the
 * caller passes one (loops unrolled, tile strides folded). */
static inline __attribute__((always_inline)) void amx_blocks(
        int64_t b0, int64_t b1, int64_t M, const int64_t H, const uint16_t *rows, int64_t K, const float *bias0,
        int64_t L, const uint16_t *packed, const float *hbias, const float *w_out, float b_out, int64_t act,
        float *out, float *cbuf, uint16_t *abuf) {
    const int64_t kbs = H / 32, nbs = H / 16;
    /* The rows of the block AMX_PF_AHEAD blocks ahead are prefetched into L2 a few lines per tile product (the
     * products of every member and layer share them out): the hardware prefetchers would see a block's rows only
     * when its h_0 is made, and stop at page boundaries. Measured on the AMX machine (64^3 rows, 2 threads),
     * time against this way: no prefetch 1.4x; one burst per column pair one block ahead (the former way) 1.16x;
     * 2, 8 or 16 blocks ahead 1.0x; into L1 instead of L2 1.02x; before the tile loads 1.015x, between the
     * products 1.14x, in h_0 / the vector passes 1.03-1.19x. */
    const int64_t slots = K * L * (nbs / 2) * kbs;
    const int64_t pf_lines = slots ? (AMX_MB * H * 2 / 64 + slots - 1) / slots : 0;
    for (int64_t blk = b0; blk < b1; blk++) for (int64_t k = 0; k < K; k++) {      /* each member */
        const int64_t r0 = blk * AMX_MB, n = M - r0 < AMX_MB ? M - r0 : AMX_MB;
        const int64_t pf_row = r0 + AMX_PF_AHEAD * AMX_MB;
        const int64_t pf_end = blk + AMX_PF_AHEAD < b1 ?                           /* lines of that block */
            (M - pf_row < AMX_MB ? M - pf_row : AMX_MB) * H * 2 / 64 : 0;
        const char *pf_base = (const char *)(rows + (pf_end ? pf_row : 0) * H);
        const float *bk = bias0 + k * H;
        for (int64_t r = 0; r < AMX_MB; r++)                                  /* h_0, rows past the end 0 */
            for (int64_t c = 0; c < H; c += 32) {                             /* 32 values at a time */
                __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
                if (r < n) {
                    const uint16_t *x = rows + (r0 + r) * H + c;
                    v0 = _mm512_add_ps(V_LOAD_BF16(x), _mm512_loadu_ps(bk + c));
                    v1 = _mm512_add_ps(V_LOAD_BF16(x + 16), _mm512_loadu_ps(bk + c + 16));
                }
                if (L == 0) {                                                 /* the ReLU: below */
                    _mm512_storeu_ps(cbuf + r * H + c, v0);
                    _mm512_storeu_ps(cbuf + r * H + c + 16, v1);
                } else {
                    store32_relu_bf16(abuf + r * H + c, v0, v1);
                }
            }
        for (int64_t l = 0; l < L; l++) {
            const uint16_t *wl = packed + l * H * H;
            const float *bl = hbias + l * H;
            for (int64_t nb = 0; nb < nbs; nb += 2) {                          /* 32 output columns at a time */
                _tile_loadd(0, bl + nb * 16, 0);            /* the sums start at the bias (on every row) */
                _tile_loadd(1, bl + nb * 16 + 16, 0);
                _tile_loadd(2, bl + nb * 16, 0);
                _tile_loadd(3, bl + nb * 16 + 16, 0);
                for (int64_t kb = 0; kb < kbs; kb++) {
                    const int64_t slot = ((k * L + l) * (nbs / 2) + nb / 2) * kbs + kb;
                    _tile_loadd(4, abuf + kb * 32, H * 2);
                    _tile_loadd(5, abuf + 16 * H + kb * 32, H * 2);
                    _tile_loadd(6, wl + (kb * nbs + nb) * 512, 64);
                    _tile_loadd(7, wl + (kb * nbs + nb + 1) * 512, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                    for (int64_t i = slot * pf_lines; i < (slot + 1) * pf_lines && i < pf_end; i++)
                        __builtin_prefetch(pf_base + i * 64, 0, 1);      /* into L2, after the products */
                }
                _tile_stored(0, cbuf + nb * 16, H * 4);
                _tile_stored(1, cbuf + nb * 16 + 16, H * 4);
                _tile_stored(2, cbuf + 16 * H + nb * 16, H * 4);
                _tile_stored(3, cbuf + 16 * H + nb * 16 + 16, H * 4);
            }
            if (l < L - 1)                                    /* ReLU, rounded to bf16: the next input */
                for (int64_t r = 0; r < AMX_MB; r++)
                    for (int64_t c = 0; c < H; c += 32)
                        store32_relu_bf16(abuf + r * H + c, _mm512_loadu_ps(cbuf + r * H + c),
                                          _mm512_loadu_ps(cbuf + r * H + c + 16));
        }
        float o[AMX_MB];
        for (int64_t r = 0; r < n; r++) {             /* h_L = ReLU of the float32 sums; the output layer */
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < H; c += 16)
                acc = _mm512_fmadd_ps(_mm512_max_ps(_mm512_setzero_ps(), _mm512_loadu_ps(cbuf + r * H + c)),
                                      _mm512_loadu_ps(w_out + c), acc);
            o[r] = _mm512_reduce_add_ps(acc) + b_out;
        }
        for (int64_t r = 0; r < n; r += 16) {         /* the output activation, 16 rows at a time */
            const __mmask16 live = n - r >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - r)) - 1u);
            _mm512_mask_storeu_ps(out + k * M + r0 + r, live,
                                  amx_activation(_mm512_maskz_loadu_ps(live, o + r), act));
        }
    }
}

int64_t baked_mlp_amx(int64_t M, int64_t H, const uint16_t *rows, int64_t K, const float *bias0, int64_t L,
                      const uint16_t *packed, const float *hbias, const float *w_out, float b_out, int64_t act,
                      float *out) {
    if (!amx_granted()) return -1;
    const int64_t nblk = (M + AMX_MB - 1) / AMX_MB;
    const int64_t per_thread = AMX_MB * H * 3 / 2;      /* floats: float32 results + a bf16 operand (AMX_MB, H) */
    float *bufs = (float *)aligned_alloc(64, (size_t)(num_threads() * per_thread) * sizeof(float));
    if (bufs == NULL) return 1;
    #pragma omp parallel
    {
        float *cbuf = bufs + thread_num() * per_thread;                 /* (AMX_MB, H) float32 */
        uint16_t *abuf = (uint16_t *)(cbuf + AMX_MB * H);                /* (AMX_MB, H) bf16 */
        amx_config_t cfg = {0};
        cfg.palette = 1;
        for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
        _tile_loadconfig(&cfg);
        int64_t b0, b1;
        thread_range(nblk, &b0, &b1);
        if (H == 128)                                   /* every paper model's width: a constant */
            amx_blocks(b0, b1, M, 128, rows, K, bias0, L, packed, hbias, w_out, b_out, act, out, cbuf, abuf);
        else
            amx_blocks(b0, b1, M, H, rows, K, bias0, L, packed, hbias, w_out, b_out, act, out, cbuf, abuf);
        _tile_release();
    }
    free(bufs);
    return 0;
}
int64_t has_amx(void) { return 1; }
#else
int64_t baked_mlp_amx(int64_t M, int64_t H, const uint16_t *rows, int64_t K, const float *bias0, int64_t L,
                      const uint16_t *packed, const float *hbias, const float *w_out, float b_out, int64_t act,
                      float *out) {
    (void)M; (void)H; (void)rows; (void)K; (void)bias0; (void)L; (void)packed; (void)hbias; (void)w_out; (void)b_out;
    (void)act; (void)out;
    return -1;
}
int64_t has_amx(void) { return 0; }
#endif
