/* Coordinate Attention on the CPU in float32: inference in one pass over the block, and the gate
 * product of training with its backward.
 *
 * The PyTorch formulation runs a dozen small ops a block; at the sizes of a mobile network's
 * blocks (rows of 7-56 elements, GEMMs of a few thousand multiply-adds) their fixed costs
 * dominate. Here the same arithmetic runs as plain loops that the compiler vectorises: pool both
 * strips, the shared 1x1 conv (BN folded in) with hard-swish, the two gate convs with sigmoid,
 * and the product, reading the input twice and writing the output once.
 *
 * Samples are split over threads (as many as torch uses, from torch's OpenMP pool), each with its
 * own workspace; in inference, a batch of fewer samples than threads is shared by all of them.
 * Called from timm_coordatt/native.py, which checks dtypes, devices, shapes and memory formats;
 * pointers come in as integers (no torch headers, so building needs only a C compiler).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CA_MAX_THREADS 64

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
/* an AVX2/FMA version next to the baseline one, picked when the module loads; the channels_last
 * loops, over C contiguous channels, also an AVX-512 one (the contiguous layout's rows of 7-56
 * elements run slower in 16 lanes) */
#define CA_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define CA_TARGET_CLONES_WIDE __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CA_TARGET_CLONES
#define CA_TARGET_CLONES_WIDE
#endif

#if defined(__GNUC__)
#define CA_INLINE static inline __attribute__((always_inline))
#else
#define CA_INLINE static inline
#endif

/* exp(v) for v in [-87, 88] within 2 ulp (Cephes' expf), without branches or calls so that loops
 * over it vectorise; 2^k is built in the exponent bits */
CA_INLINE float ca_exp(float v) {
    v = v > 88.0f ? 88.0f : v;
    v = v < -87.0f ? -87.0f : v;
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const float k_shifted = v * 1.44269504088896341f + shifter;
    const float k = k_shifted - shifter;
    v = v - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * v + 1.3981999507e-3f;
    p = p * v + 8.3334519073e-3f;
    p = p * v + 4.1665795894e-2f;
    p = p * v + 1.6666665459e-1f;
    p = p * v + 5.0000001201e-1f;
    p = p * v * v + v + 1.0f;
    int32_t k_bits, shifter_bits;
    memcpy(&k_bits, &k_shifted, sizeof(k_bits));
    memcpy(&shifter_bits, &shifter, sizeof(shifter_bits));
    /* unsigned: a NaN input makes k_bits anything, and a signed shift out of range is undefined */
    const uint32_t bits = ((uint32_t)k_bits - (uint32_t)shifter_bits + 127u) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

CA_INLINE float ca_hardswish(float v) {
    float r = v + 3.0f;
    r = r < 0.0f ? 0.0f : (r > 6.0f ? 6.0f : r);
    return v * r / 6.0f;
}

/* The channels_last kernel keeps the strips and gates as (L, C) rows, L = H + W, as its pooling and
 * product run over channels: y (rd, L) = hardswish(w1 (rd, C) @ s + b1) takes dot products of length
 * C, and the gates a (L, C) = sigmoid(y^T @ wg + bg), wg (rd, 2C) = [w_h^T | w_w^T], axpys of length C.
 * The contiguous kernel keeps them as (C, L) rows, as its pooling and product run over positions
 * (see ca_conv1_strips). Each step of a sample works on a range: of channels (pooling, gate convs,
 * product) or of rows of the shared conv, so that the threads of a team can share one sample. */

/* Rows of up to CA_SHORT_ROW elements (the 7- to 56-wide maps of a network's last four stages) leave
 * a vector loop over W a scalar remainder, or all scalar, and a reduction per row through memory.
 * Their loops instead take whole vectors of `lanes` (W rounded up to a multiple of 8, a constant
 * where inlined, so that the row's sums stay in registers) from the row's start, running on into
 * the following rows of the same plane, and mask the lanes past the row; rows too near the plane's
 * end for that take plain loops. */
#define CA_SHORT_ROW 64

/* The training kernels' passes over a batch's channels_last tensors, a position's C channels at a time,
 * read them from memory, where the hardware's prefetchers fell behind: `ahead`, each position also asks
 * for the lines CA_AHEAD floats further on, within the sample's `size` floats. Only for tensors of
 * CA_AHEAD_MIN_BYTES or more, which cannot be in the caches (smaller ones may, where the asking costs more
 * than it saves), and not in inference, on maps the layer before has just written. */
#define CA_AHEAD 1024
#define CA_AHEAD_MIN_BYTES (16 << 20)

CA_INLINE void ca_prefetch_ahead(const float *p, int64_t at, int64_t c, int64_t size, int ahead) {
#if defined(__GNUC__)
    if (ahead && at + CA_AHEAD + c <= size)
        for (int64_t k = 0; k < c; k += 16) __builtin_prefetch(p + at + CA_AHEAD + k, 0, 3);
#else
    (void)p;
    (void)at;
    (void)c;
    (void)size;
    (void)ahead;
#endif
}

/* rows [i0, h) of a channel plane (H, W) in plain loops: their means over W into sc, their elements
 * added to the column sums `cols` */
CA_INLINE void ca_plane_rows(const float *xc, float *sc, float *cols, int64_t i0, int64_t h, int64_t w) {
    const float inv_w = 1.0f / (float)w;
    for (int64_t i = i0; i < h; i++) {
        const float *row = xc + i * w;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < w; j++) {
            acc += row[j];
            cols[j] += row[j];
        }
        sc[i] = acc * inv_w;
    }
}

/* Vectors of eight floats (GCC's and clang's vector extensions), for the row sums of short rows */
#if defined(__GNUC__)
#define CA_VECTORS 1
typedef float ca_v8 __attribute__((vector_size(32)));
typedef int32_t ca_v8i __attribute__((vector_size(32)));
#if defined(__clang__)
#define CA_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define CA_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (ca_v8i){__VA_ARGS__})
#endif

/* sums of neighbouring lanes: a's pairs in lanes 0-1 and 4-5, b's in 2-3 and 6-7 (macros here: vectors
 * passed by value change the ABI of the clones without AVX, which GCC warns of) */
#define CA_HADD(a, b) (CA_SHUFFLE(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + CA_SHUFFLE(a, b, 1, 3, 9, 11, 5, 7, 13, 15))

/* out[k] = scale * the sum of the lanes of v[k], k < 8: seven pairwise sums of vectors where eight
 * reductions of one vector each take three */
CA_INLINE void ca_lane_sums8(const ca_v8 v[8], float scale, float out[8]) {
    const ca_v8 u0 = CA_HADD(CA_HADD(v[0], v[1]), CA_HADD(v[2], v[3]));
    const ca_v8 u1 = CA_HADD(CA_HADD(v[4], v[5]), CA_HADD(v[6], v[7]));
    const ca_v8 sums = CA_SHUFFLE(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) + CA_SHUFFLE(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
    const ca_v8 scaled = sums * scale;
    memcpy(out, &scaled, sizeof(scaled));
}

/* both strips of a plane of rows of at most 8 elements: each row one vector, the lanes past the row
 * selected out, added to the column sums; eight rows' vectors summed at once (ca_lane_sums8), where
 * each row's own reduction took most of the pooling's time at 7x7 (wider rows spend less of it there,
 * and went slower this way: 0.6x at 28x28); `readable` floats from xc may be loaded (rows nearer the
 * end: plain loops) */
CA_INLINE void ca_strips_plane8(const float *xc, float *sc, float *col, int64_t h, int64_t w, int64_t readable) {
    const float inv_h = 1.0f / (float)h, inv_w = 1.0f / (float)w;
    const ca_v8i lane = {0, 1, 2, 3, 4, 5, 6, 7}, keep = lane < (int32_t)w;
    ca_v8 cols = {0.0f}, rows[8];
    const int64_t loadable = (readable - 8) / w + 1, whole = loadable < h ? loadable : h;
    for (int64_t i0 = 0; i0 < whole; i0 += 8) {
        for (int64_t n = 0; n < 8; n++) {
            ca_v8 v = {0.0f};
            if (i0 + n < whole) {
                memcpy(&v, xc + (i0 + n) * w, sizeof(v));
                v = (ca_v8)((ca_v8i)v & keep);
            }
            cols += v;
            rows[n] = v;
        }
        float m[8];
        ca_lane_sums8(rows, inv_w, m);
        for (int64_t n = 0; n < 8 && i0 + n < whole; n++) sc[i0 + n] = m[n];
    }
    float sums[8];
    memcpy(sums, &cols, sizeof(sums));
    ca_plane_rows(xc, sc, sums, whole, h, w);
    for (int64_t j = 0; j < w; j++) col[j] = sums[j] * inv_h;
}
#endif

/* both strips of one channel plane (H, W): row means into sc[0, H), column means into col[0, W) */
CA_INLINE void ca_strips_plane(const float *xc, float *sc, float *col, int64_t h, int64_t w, const int64_t lanes,
                               int64_t readable) {
#if defined(CA_VECTORS)
    if (lanes == 8 && readable >= 8) {
        ca_strips_plane8(xc, sc, col, h, w, readable);
        return;
    }
#else
    (void)readable;
#endif
    const float inv_h = 1.0f / (float)h, inv_w = 1.0f / (float)w;
    if (lanes > 0 && lanes <= h * w) {
        /* the column sums start as the first row, stored in vectors as wide as the loop loads them:
         * zeroing them first takes narrower stores, which would stall that load (a load spanning
         * two stores is not forwarded); for the same reason they stay here, not in `col`, to the end */
        float cols[CA_SHORT_ROW], first = 0.0f;
#pragma omp simd reduction(+ : first)
        for (int64_t k = 0; k < lanes; k++) {
            cols[k] = k < w ? xc[k] : 0.0f;
            first += cols[k];
        }
        sc[0] = first * inv_w;
        int64_t i = 1;
        for (; i * w + lanes <= h * w; i++) {
            const float *row = xc + i * w;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t k = 0; k < lanes; k++) {
                const float v = row[k], masked = k < w ? v : 0.0f;
                acc += masked;
                cols[k] += masked;
            }
            sc[i] = acc * inv_w;
        }
        ca_plane_rows(xc, sc, cols, i, h, w); /* rows too near the plane's end for whole vectors */
        for (int64_t j = 0; j < w; j++) col[j] = cols[j] * inv_h;
        return;
    }
    for (int64_t j = 0; j < w; j++) col[j] = 0.0f;
    ca_plane_rows(xc, sc, col, 0, h, w);
    for (int64_t j = 0; j < w; j++) col[j] *= inv_h;
}

/* row[k] = src[k] * scale for k < w, `fill` for the lanes after, k < lanes; by whole vectors where
 * `readable` floats from src may be loaded: stored element by element, the row's first load as a vector
 * would stall (a load spanning two stores is not forwarded), once a plane */
CA_INLINE void ca_row_of_lanes(float *row, const float *src, float scale, int64_t w, const int64_t lanes,
                               int64_t readable, float fill) {
    if (readable >= lanes) {
#pragma omp simd
        for (int64_t k = 0; k < lanes; k++) {
            const float v = src[k] * scale;
            row[k] = k < w ? v : fill;
        }
    } else {
        for (int64_t k = 0; k < lanes; k++) row[k] = k < w ? src[k] * scale : fill;
    }
}

/* rows of a short-row plane's product staged in a buffer at a time, in place */
#define CA_STAGED_ROWS 16

/* one channel plane of the product, out = (x * a_h) * a_w in PyTorch's rounding. Short rows: the
 * lanes past the row multiply the next row's elements by 1 and store them unchanged, which that
 * row then overwrites. In place, that store would stall the next row's load (a load overlapping
 * part of a store is not forwarded), so the rows go through a buffer, CA_STAGED_ROWS at a time,
 * copied to `oc` after; rows of whole vectors have no such lanes and need none. `aw_readable` floats
 * from aw may be loaded. */
CA_INLINE void ca_scale_plane(const float *xc, float *oc, const float *ah, const float *aw, int64_t h, int64_t w,
                              const int64_t lanes, int64_t aw_readable) {
    int64_t i = 0;
    if (lanes > 0) {
        const int in_place = xc == oc && lanes != w;
        float aws[CA_SHORT_ROW], staged[(CA_STAGED_ROWS + 1) * CA_SHORT_ROW];
        ca_row_of_lanes(aws, aw, 1.0f, w, lanes, aw_readable, 1.0f);
        while (i * w + lanes <= h * w) {
            const int64_t first = i;
            float *dst = in_place ? staged : oc + first * w;
            for (; (!in_place || i - first < CA_STAGED_ROWS) && i * w + lanes <= h * w; i++) {
                const float g = ah[i];
                const float *row = xc + i * w;
                float *drow = dst + (i - first) * w;
#pragma omp simd
                for (int64_t k = 0; k < lanes; k++) drow[k] = row[k] * (k < w ? g : 1.0f) * aws[k];
            }
            if (in_place) memcpy(oc + first * w, staged, (size_t)((i - first) * w) * sizeof(float));
        }
    }
    for (; i < h; i++) {
        const float g = ah[i];
        const float *row = xc + i * w;
        float *orow = oc + i * w;
        for (int64_t j = 0; j < w; j++) orow[j] = row[j] * g * aw[j];
    }
}

/* each of the two above specialised: short rows by their whole vectors of 8, and long rows (lanes 0) */
#define CA_BY_ROW_LENGTH(w, call_with_lanes) \
    do { \
        if ((w) <= 8) call_with_lanes(8); \
        else if ((w) <= 16) call_with_lanes(16); \
        else if ((w) <= 24) call_with_lanes(24); \
        else if ((w) <= 32) call_with_lanes(32); \
        else if ((w) <= 40) call_with_lanes(40); \
        else if ((w) <= 48) call_with_lanes(48); \
        else if ((w) <= 56) call_with_lanes(56); \
        else if ((w) <= CA_SHORT_ROW) call_with_lanes(CA_SHORT_ROW); \
        else call_with_lanes(0); \
    } while (0)

/* pooling, channels [c0, c1) of one sample (C, H, W) contiguous: both strips of each into rows of s
 * `stride` apart, the means over W at 0, those over H at `w_at` */
CA_INLINE void ca_strips_nchw(const float *x, float *s, int64_t stride, int64_t w_at, int64_t c, int64_t h, int64_t w,
                              int64_t c0, int64_t c1) {
#define CA_STRIPS_CHANNELS(lanes) \
    for (int64_t ch = c0; ch < c1; ch++) \
        ca_strips_plane(x + ch * h * w, s + ch * stride, s + ch * stride + w_at, h, w, lanes, (c - ch) * h * w)
    CA_BY_ROW_LENGTH(w, CA_STRIPS_CHANNELS);
#undef CA_STRIPS_CHANNELS
}

/* the product of planes [c0, c1) of one sample, a_h (C, H) and a_w (C, W) rows `stride` apart;
 * `aw_readable` floats from aw (channel 0's row) may be loaded */
CA_INLINE void ca_scale_planes(const float *x, float *out, const float *ah, const float *aw, int64_t stride_h,
                               int64_t stride_w, int64_t h, int64_t w, int64_t c0, int64_t c1, int64_t aw_readable) {
#define CA_SCALE_CHANNELS(lanes) \
    for (int64_t ch = c0; ch < c1; ch++) \
        ca_scale_plane(x + ch * h * w, out + ch * h * w, ah + ch * stride_h, aw + ch * stride_w, h, w, lanes, \
                       aw_readable - ch * stride_w)
    if (w > 16 && w % 8 == 0)
        CA_SCALE_CHANNELS(0); /* whole vectors and no reduction: plain loops are as fast, faster in place */
    else
        CA_BY_ROW_LENGTH(w, CA_SCALE_CHANNELS);
#undef CA_SCALE_CHANNELS
}

/* Rows of a channels_last sample that the pooling (inference and training) and the inference product read
 * side by side, so that what a position shares with the rows below it is read (and written) once for them
 * all: the pooling's sums over H, where a row at a time every vector of x cost two stores and the pass ran at
 * the pace of the stores (1.4-2.4x slower hot at batch 1, `python benchmarks/native_ab.py`); the product's
 * column gate (1.0-1.1x) */
#define CA_ROWS 4

/* rows [i, i + rows) of one sample (H, W, C) contiguous: their sums over W into rows i.. of s, their
 * elements added to the sums over H in sw (W, C); rows a constant where inlined */
CA_INLINE void ca_pool_rows_nhwc(const float *x, float *s, float *sw, int64_t c, int64_t w, int64_t i,
                                 const int64_t rows, int64_t size, int ahead) {
    float *sh = s + i * c;
    const int64_t row = w * c;
    memset(sh, 0, (size_t)(rows * c) * sizeof(float));
    for (int64_t j = 0; j < w; j++) {
        for (int64_t r = 0; r < rows; r++) ca_prefetch_ahead(x, (i + r) * row + j * c, c, size, ahead);
        const float *px = x + i * row + j * c;
        float *swj = sw + j * c;
#pragma omp simd
        for (int64_t ch = 0; ch < c; ch++) {
            float column = 0.0f;
            for (int64_t r = 0; r < rows; r++) {
                const float v = px[r * row + ch];
                sh[r * c + ch] += v;
                column += v;
            }
            swj[ch] += column;
        }
    }
}

/* pooling of rows [i0, i1) of one sample (H, W, C) contiguous (a channels_last tensor): their
 * means over W into rows [i0, i1) of s (L, C), their sums over H into sw (W, C) */
CA_INLINE void ca_pool_nhwc(const float *x, float *s, float *sw, int64_t c, int64_t w, int64_t i0, int64_t i1,
                             int64_t size, int ahead) {
    const float inv_w = 1.0f / (float)w;
    memset(sw, 0, (size_t)(w * c) * sizeof(float));
    int64_t i = i0;
    for (; i + CA_ROWS <= i1; i += CA_ROWS) ca_pool_rows_nhwc(x, s, sw, c, w, i, CA_ROWS, size, ahead);
    for (; i + 2 <= i1; i += 2) ca_pool_rows_nhwc(x, s, sw, c, w, i, 2, size, ahead);
    for (; i < i1; i++) ca_pool_rows_nhwc(x, s, sw, c, w, i, 1, size, ahead);
    for (int64_t k = i0 * c; k < i1 * c; k++) s[k] *= inv_w;
}

/* y[r, l] = acc + b1[r], through hard-swish if `act`, y's rows `stride` apart */
CA_INLINE void ca_conv1_out(float *y, int64_t stride, const float *b1, int64_t r, int64_t l, float acc, const int act) {
    const float v = acc + (b1 ? b1[r] : 0.0f);
    y[r * stride + l] = act ? ca_hardswish(v) : v;
}

/* the four dot products p_k . q_k of length c, as four independent sums */
CA_INLINE void ca_dot4(const float *p0, const float *p1, const float *p2, const float *p3, const float *q0,
                       const float *q1, const float *q2, const float *q3, int64_t c, float out[4]) {
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t ch = 0; ch < c; ch++) {
        a0 += p0[ch] * q0[ch];
        a1 += p1[ch] * q1[ch];
        a2 += p2[ch] * q2[ch];
        a3 += p3[ch] * q3[ch];
    }
    out[0] = a0;
    out[1] = a1;
    out[2] = a2;
    out[3] = a3;
}

/* The shared conv, with hard-swish if `act`, rows [r0, r1) of y (rd, len; rows y_stride apart) from
 * s (len, C), w1's rows w_stride apart; r0 a multiple of 4. Eight sums at a time, four rows of w1 at
 * two positions (one row at four past the last four rows): with fewer, each multiply-add waits on
 * the one before into the same sum. (Training also runs the gate convs' backward through it.) */
CA_INLINE void ca_conv1(const float *s, float *y, int64_t c, int64_t len, int64_t y_stride,
                        const float *w1, int64_t w_stride, const float *b1, int64_t r0, int64_t r1, const int act) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        const float *w0 = w1 + r * w_stride, *w1r = w0 + w_stride, *w2 = w1r + w_stride, *w3 = w2 + w_stride;
        int64_t l = 0;
        for (; l + 2 <= len; l += 2) {
            const float *sa = s + l * c, *sb = sa + c;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f, b0 = 0.0f, b1r = 0.0f, b2 = 0.0f, b3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1r, b2, b3)
            for (int64_t ch = 0; ch < c; ch++) {
                const float u = sa[ch], v = sb[ch];
                a0 += w0[ch] * u;
                a1 += w1r[ch] * u;
                a2 += w2[ch] * u;
                a3 += w3[ch] * u;
                b0 += w0[ch] * v;
                b1r += w1r[ch] * v;
                b2 += w2[ch] * v;
                b3 += w3[ch] * v;
            }
            ca_conv1_out(y, y_stride, b1, r, l, a0, act);
            ca_conv1_out(y, y_stride, b1, r + 1, l, a1, act);
            ca_conv1_out(y, y_stride, b1, r + 2, l, a2, act);
            ca_conv1_out(y, y_stride, b1, r + 3, l, a3, act);
            ca_conv1_out(y, y_stride, b1, r, l + 1, b0, act);
            ca_conv1_out(y, y_stride, b1, r + 1, l + 1, b1r, act);
            ca_conv1_out(y, y_stride, b1, r + 2, l + 1, b2, act);
            ca_conv1_out(y, y_stride, b1, r + 3, l + 1, b3, act);
        }
        for (; l < len; l++) {
            const float *sl = s + l * c;
            float acc[4];
            ca_dot4(w0, w1r, w2, w3, sl, sl, sl, sl, c, acc);
            for (int k = 0; k < 4; k++) ca_conv1_out(y, y_stride, b1, r + k, l, acc[k], act);
        }
    }
    for (; r < r1; r++) {
        const float *wr = w1 + r * w_stride;
        int64_t l = 0;
        for (; l + 4 <= len; l += 4) {
            const float *s0 = s + l * c;
            float acc[4];
            ca_dot4(wr, wr, wr, wr, s0, s0 + c, s0 + 2 * c, s0 + 3 * c, c, acc);
            for (int k = 0; k < 4; k++) ca_conv1_out(y, y_stride, b1, r, l + k, acc[k], act);
        }
        for (; l < len; l++) {
            const float *sl = s + l * c;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t ch = 0; ch < c; ch++) acc += wr[ch] * sl[ch];
            ca_conv1_out(y, y_stride, b1, r, l, acc, act);
        }
    }
}

/* The contiguous kernel keeps its strips, and their gates, as (C, lp) rows, as the pooling and the
 * product take them: the means over W at [0, H), those over H at [hp, hp + W), hp = H rounded up to a
 * multiple of 8, lp = hp + W rounded up likewise, zeros between; y (rd, lp) alike. Its shared conv and
 * gate convs then run vectorised over positions, each strip in whole vectors, where the (L, C) form
 * of the channels_last kernel would need the strips transposed and the gates back (copies through
 * workspace that a network's forward leaves cold). */
#define CA_ROUND8(n) (((n) + 7) / 8 * 8)

/* Positions a block of the shared conv: four rows' sums over them in eight vectors */
#define CA_POSITIONS 16

/* rows [r, r + rows) of y (rd, lp) at positions [l0, l0 + width) from t (C, lp); sums over channels
 * in order; rows and width constants where inlined */
CA_INLINE void ca_conv1_positions(const float *t, float *y, int64_t c, int64_t lp, const float *w1, const float *b1,
                                  int64_t r, const int64_t rows, int64_t l0, const int64_t width) {
    float acc[4 * CA_POSITIONS];
    for (int64_t k = 0; k < rows * width; k++) acc[k] = 0.0f;
    for (int64_t ch = 0; ch < c; ch++) {
        const float *tc = t + ch * lp + l0;
        for (int64_t k = 0; k < rows; k++) {
            const float wk = w1[(r + k) * c + ch];
#pragma omp simd
            for (int64_t j = 0; j < width; j++) acc[k * width + j] += wk * tc[j];
        }
    }
    for (int64_t k = 0; k < rows; k++)
        for (int64_t j = 0; j < width; j++) ca_conv1_out(y, lp, b1, r + k, l0 + j, acc[k * width + j], 1);
}

/* the shared conv with hard-swish on (C, lp) strips, rows [r0, r1) of y: four rows (then two, one)
 * over CA_POSITIONS positions at a time */
CA_INLINE void ca_conv1_strips(const float *t, float *y, int64_t c, int64_t lp, const float *w1, const float *b1,
                               int64_t r0, int64_t r1) {
#define CA_CONV1_ROWS(width) \
    do { \
        int64_t r = r0; \
        for (; r + 4 <= r1; r += 4) ca_conv1_positions(t, y, c, lp, w1, b1, r, 4, l0, width); \
        for (; r + 2 <= r1; r += 2) ca_conv1_positions(t, y, c, lp, w1, b1, r, 2, l0, width); \
        for (; r < r1; r++) ca_conv1_positions(t, y, c, lp, w1, b1, r, 1, l0, width); \
    } while (0)
    int64_t l0 = 0;
    for (; l0 + CA_POSITIONS <= lp; l0 += CA_POSITIONS) CA_CONV1_ROWS(CA_POSITIONS);
    if (l0 < lp) CA_CONV1_ROWS(8);
#undef CA_CONV1_ROWS
}

/* gates with sigmoid of channels [ch, ch + chans) at the 8 positions from p of y (rd, lp), into t
 * (C, lp); the weights w_h^T (`offset` 0) or w_w^T (`offset` C); chans a constant where inlined */
CA_INLINE void ca_gate_positions(const float *y, float *t, int64_t c, int64_t lp, int64_t rd, const float *wg,
                                 const float *bg, int64_t offset, int64_t ch, const int64_t chans, int64_t p) {
    float acc[8 * 8];
    for (int64_t k = 0; k < chans; k++)
        for (int64_t j = 0; j < 8; j++) acc[k * 8 + j] = bg ? bg[offset + ch + k] : 0.0f;
    for (int64_t r = 0; r < rd; r++) {
        const float *yr = y + r * lp + p, *wr = wg + r * 2 * c + offset + ch;
        for (int64_t k = 0; k < chans; k++) {
            const float wk = wr[k];
#pragma omp simd
            for (int64_t j = 0; j < 8; j++) acc[k * 8 + j] += wk * yr[j];
        }
    }
    for (int64_t k = 0; k < chans; k++) {
        float *tk = t + (ch + k) * lp + p;
#pragma omp simd
        for (int64_t j = 0; j < 8; j++) tk[j] = 1.0f / (1.0f + ca_exp(-acc[k * 8 + j]));
    }
}

/* both gate convs with sigmoid for channels [c0, c1) on (C, lp) strips: eight channels (then one)
 * over 8 positions at a time, the h-strip's positions [0, hp) with w_h, the rest with w_w */
CA_INLINE void ca_gate_strips(const float *y, float *t, int64_t c, int64_t hp, int64_t lp, int64_t rd,
                              const float *wg, const float *bg, int64_t c0, int64_t c1) {
    for (int64_t p = 0; p < lp; p += 8) {
        const int64_t offset = p < hp ? 0 : c;
        int64_t ch = c0;
        for (; ch + 8 <= c1; ch += 8) ca_gate_positions(y, t, c, lp, rd, wg, bg, offset, ch, 8, p);
        for (; ch < c1; ch++) ca_gate_positions(y, t, c, lp, rd, wg, bg, offset, ch, 1, p);
    }
}

/* Channels a block of the gate convs: the block's sums stay in registers over all rd rows of the
 * weights, and its columns of them (rd x CA_GATE_BLOCK floats) in L1 over the strips' positions,
 * where sums over all of C went through memory once every four rows. */
#define CA_GATE_BLOCK 32

/* both gate convs, with sigmoid if `act`, for channels [c, c + width) of a (L, C) from y (rd, L), width
 * at most CA_GATE_BLOCK (a constant where inlined for whole blocks); the last W rows of a at a_second
 * (a + H * C: one (L, C) tensor); the weights' rows w_stride apart, w_h^T from column 0, w_w^T from
 * column w_second (training also runs conv1's backward through it: one weight for all positions) */
CA_INLINE void ca_gate_conv_block(const float *y, float *a, float *a_second, int64_t c, int64_t h, int64_t len,
                                  int64_t rd, const float *wg, int64_t w_stride, int64_t w_second, const float *bg,
                                  int64_t ch, const int64_t width, const int act) {
    for (int64_t l = 0; l < len; l++) {
        const int64_t offset = (l < h ? 0 : w_second) + ch;
        /* `+ 0.0f` keeps the start a vector op: as a copy it is made by narrower stores, which would
         * stall the first load of the sums (a load spanning two stores is not forwarded) */
        float acc[CA_GATE_BLOCK];
        for (int64_t k = 0; k < width; k++) acc[k] = bg ? bg[offset + k] + 0.0f : 0.0f;
        int64_t r = 0;
        for (; r + 4 <= rd; r += 4) {
            const float v0 = y[r * len + l], v1 = y[(r + 1) * len + l];
            const float v2 = y[(r + 2) * len + l], v3 = y[(r + 3) * len + l];
            const float *w0 = wg + r * w_stride + offset, *w1r = w0 + w_stride, *w2 = w1r + w_stride, *w3 = w2 + w_stride;
            for (int64_t k = 0; k < width; k++) acc[k] += v0 * w0[k] + v1 * w1r[k] + v2 * w2[k] + v3 * w3[k];
        }
        for (; r < rd; r++) {
            const float v = y[r * len + l];
            const float *wr = wg + r * w_stride + offset;
            for (int64_t k = 0; k < width; k++) acc[k] += v * wr[k];
        }
        float *al = (l < h ? a + l * c : a_second + (l - h) * c) + ch;
        if (act)
            for (int64_t k = 0; k < width; k++) al[k] = 1.0f / (1.0f + ca_exp(-acc[k]));
        else
            for (int64_t k = 0; k < width; k++) al[k] = acc[k];
    }
}

/* both gate convs (see ca_gate_conv_block) for channels [c0, c1): a (L, C) from y (rd, L) */
CA_INLINE void ca_gate_convs(const float *y, float *a, float *a_second, int64_t c, int64_t h, int64_t w, int64_t rd,
                             const float *wg, int64_t w_stride, int64_t w_second, const float *bg,
                             int64_t c0, int64_t c1, const int act) {
    int64_t ch = c0;
    for (; ch + CA_GATE_BLOCK <= c1; ch += CA_GATE_BLOCK)
        ca_gate_conv_block(y, a, a_second, c, h, h + w, rd, wg, w_stride, w_second, bg, ch, CA_GATE_BLOCK, act);
    if (ch < c1)
        ca_gate_conv_block(y, a, a_second, c, h, h + w, rd, wg, w_stride, w_second, bg, ch, c1 - ch, act);
}

/* g[r, ch + k] += sum over positions l of u[r, l] * v[l, ch + k] for rows [r0, r0 + rows) and k < width:
 * u (rd, len) rows u_stride apart, v (len, C), g rows g_stride apart; rows and width constants where
 * inlined, so that the rows x width sums stay in registers over all positions */
CA_INLINE void ca_outer_block(const float *u, int64_t u_stride, const float *v, int64_t c, int64_t len, float *g,
                              int64_t g_stride, int64_t r0, const int64_t rows, int64_t ch, const int64_t width) {
    float acc[4 * CA_GATE_BLOCK];
    for (int64_t r = 0; r < rows; r++)
        for (int64_t k = 0; k < width; k++) acc[r * width + k] = g[(r0 + r) * g_stride + ch + k] + 0.0f;
    for (int64_t l = 0; l < len; l++) {
        const float *vl = v + l * c + ch;
        for (int64_t r = 0; r < rows; r++) {
            const float ur = u[(r0 + r) * u_stride + l];
            for (int64_t k = 0; k < width; k++) acc[r * width + k] += ur * vl[k];
        }
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t k = 0; k < width; k++) g[(r0 + r) * g_stride + ch + k] = acc[r * width + k];
}

/* g (rd, C; rows g_stride apart) += u (rd, len) v (len, C): a weight's gradient, summed over a sample's
 * positions; blocks of four rows by CA_GATE_BLOCK channels */
CA_INLINE void ca_outer_sums(const float *u, int64_t u_stride, const float *v, int64_t c, int64_t len, int64_t rd,
                             float *g, int64_t g_stride) {
    int64_t ch = 0;
    for (; ch + CA_GATE_BLOCK <= c; ch += CA_GATE_BLOCK) {
        int64_t r = 0;
        for (; r + 4 <= rd; r += 4) ca_outer_block(u, u_stride, v, c, len, g, g_stride, r, 4, ch, CA_GATE_BLOCK);
        for (; r < rd; r++) ca_outer_block(u, u_stride, v, c, len, g, g_stride, r, 1, ch, CA_GATE_BLOCK);
    }
    for (; ch < c; ch++) {
        int64_t r = 0;
        for (; r + 4 <= rd; r += 4) ca_outer_block(u, u_stride, v, c, len, g, g_stride, r, 4, ch, 1);
        for (; r < rd; r++) ca_outer_block(u, u_stride, v, c, len, g, g_stride, r, 1, ch, 1);
    }
}

/* the product for rows [i, i + rows) of one sample (H, W, C) contiguous, rows a constant where inlined: each
 * position's column gate loaded once for those rows (three loads a vector of x, a row at a time) */
CA_INLINE void ca_product_rows_nhwc(const float *x, float *out, const float *a, int64_t c, int64_t h, int64_t w,
                                    int64_t i, const int64_t rows) {
    const int64_t row = w * c;
    for (int64_t j = 0; j < w; j++) {
        const float *px = x + i * row + j * c, *gh = a + i * c, *gw = a + (h + j) * c;
        float *po = out + i * row + j * c;
#pragma omp simd
        for (int64_t ch = 0; ch < c; ch++) {
            const float g = gw[ch];
            for (int64_t r = 0; r < rows; r++) po[r * row + ch] = px[r * row + ch] * gh[r * c + ch] * g;
        }
    }
}

/* the product for rows [i0, i1) of one sample (H, W, C) contiguous, CA_ROWS rows at a time */
CA_INLINE void ca_product_nhwc(const float *x, float *out, const float *a, int64_t c, int64_t h, int64_t w,
                               int64_t i0, int64_t i1) {
    int64_t i = i0;
    for (; i + CA_ROWS <= i1; i += CA_ROWS) ca_product_rows_nhwc(x, out, a, c, h, w, i, CA_ROWS);
    for (; i + 2 <= i1; i += 2) ca_product_rows_nhwc(x, out, a, c, h, w, i, 2);
    for (; i < i1; i++) ca_product_rows_nhwc(x, out, a, c, h, w, i, 1);
}

/* The product y = x * a_h * a_w for training (PyTorch's rounding: (x * a_h) * a_w, so autograd's
 * recomputation with torch ops rebuilds the same bits), and its backward in one pass:
 * grad_x = (g * a_h) * a_w, grad_a_h = sum_w x * g * a_w, grad_a_w = sum_h x * g * a_h.
 * One sample; NCHW: a_h (C, H), a_w (C, W); NHWC: a_h (H, C), a_w (W, C). */
CA_INLINE void ca_gate_nchw(const float *x, const float *ah, const float *aw, float *out,
                            int64_t c, int64_t h, int64_t w) {
    ca_scale_planes(x, out, ah, aw, h, w, h, w, 0, c, c * w);
}

CA_INLINE void ca_gate_nhwc(const float *x, const float *ah, const float *aw, float *out,
                            int64_t c, int64_t h, int64_t w) {
    for (int64_t i = 0; i < h; i++) {
        for (int64_t j = 0; j < w; j++) {
            const float *px = x + (i * w + j) * c, *gh = ah + i * c, *gw = aw + j * c;
            float *po = out + (i * w + j) * c;
            for (int64_t ch = 0; ch < c; ch++) po[ch] = px[ch] * gh[ch] * gw[ch];
        }
    }
}

/* the gate gradients of one channel plane (H, W): grad_a_h's H sums over rows, grad_a_w's W sums over
 * columns of x * grad weighted by the other gate. Short rows (lanes > 0) by whole vectors from each
 * row's start, as ca_strips_plane pools them, the lanes past the row selected out (not multiplied by
 * 0: the next row may hold infinities); the rest, and long rows, a row at a time. `aw_readable` floats
 * from aw may be loaded. */
CA_INLINE void ca_gate_grads_plane(const float *xc, const float *gc, const float *ah, const float *aw, float *gah,
                                   float *gaw, int64_t h, int64_t w, const int64_t lanes, int64_t aw_readable) {
    int64_t i = 0;
    if (lanes > 0 && lanes <= h * w) {
        /* the column sums start as the first row's terms (see ca_strips_plane) */
        float aws[CA_SHORT_ROW], cols[CA_SHORT_ROW], first = 0.0f;
        ca_row_of_lanes(aws, aw, 1.0f, w, lanes, aw_readable, 0.0f);
#pragma omp simd reduction(+ : first)
        for (int64_t k = 0; k < lanes; k++) {
            const float xv = xc[k], gv = gc[k], p = k < w ? xv * gv : 0.0f; /* loads of whole vectors */
            first += p * aws[k];
            cols[k] = ah[0] * p;
        }
        gah[0] = first;
        for (i = 1; i * w + lanes <= h * w; i++) {
            const float g = ah[i], *xr = xc + i * w, *gr = gc + i * w;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t k = 0; k < lanes; k++) {
                const float xv = xr[k], gv = gr[k], p = k < w ? xv * gv : 0.0f;
                acc += p * aws[k];
                cols[k] += g * p;
            }
            gah[i] = acc;
        }
        for (int64_t j = 0; j < w; j++) gaw[j] = cols[j];
    } else {
        for (int64_t j = 0; j < w; j++) gaw[j] = 0.0f;
    }
    for (; i < h; i++) {
        const float g = ah[i], *xr = xc + i * w, *gr = gc + i * w;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < w; j++) {
            const float p = xr[j] * gr[j];
            acc += p * aw[j];
            gaw[j] += g * p;
        }
        gah[i] = acc;
    }
}

/* with_gx = 0 (a constant where it is inlined): the gate gradients only, grad_x is left to
 * ca_strips_backward_*, which adds the pooling's gradient to it in the same pass; with_gx = 1: all
 * three, in one pass over x and grad */
CA_INLINE void ca_gate_backward_nchw(const float *x, const float *ah, const float *aw, const float *grad,
                                     float *gx, float *gah, float *gaw, int64_t c, int64_t h, int64_t w,
                                     const int with_gx) {
    if (!with_gx) {
#define CA_GATE_GRADS_CHANNELS(lanes) \
        for (int64_t ch = 0; ch < c; ch++) \
            ca_gate_grads_plane(x + ch * h * w, grad + ch * h * w, ah + ch * h, aw + ch * w, gah + ch * h, \
                                gaw + ch * w, h, w, lanes, (c - ch) * w)
        /* rows of 33-64 elements went 0.9x this way (from memory, at batch 32) */
        if (w <= 8) CA_GATE_GRADS_CHANNELS(8);
        else if (w <= 16) CA_GATE_GRADS_CHANNELS(16);
        else if (w <= 32) CA_GATE_GRADS_CHANNELS(32);
        else CA_GATE_GRADS_CHANNELS(0);
#undef CA_GATE_GRADS_CHANNELS
        return;
    }
    for (int64_t ch = 0; ch < c; ch++) {
        const float *gw = aw + ch * w;
        float *gaw_c = gaw + ch * w;
        for (int64_t j = 0; j < w; j++) gaw_c[j] = 0.0f;
        for (int64_t i = 0; i < h; i++) {
            const int64_t row = (ch * h + i) * w;
            const float g = ah[ch * h + i];
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t j = 0; j < w; j++) {
                const float p = x[row + j] * grad[row + j];
                acc += p * gw[j];
                gaw_c[j] += g * p;
                gx[row + j] = grad[row + j] * g * gw[j];
            }
            gah[ch * h + i] = acc;
        }
    }
}

CA_INLINE void ca_gate_backward_nhwc(const float *x, const float *ah, const float *aw, const float *grad,
                                     float *gx, float *gah, float *gaw, int64_t c, int64_t h, int64_t w,
                                     const int with_gx, int ahead) {
    /* x and grad in their order, a position's C channels at a time (streams the prefetchers follow;
     * in blocks of 64 channels, each a strided pass over the sample, 1.1-1.7x slower at batch 32);
     * the sums in the outputs, a_h's row and a_w's W rows, which stay in the core's caches */
    for (int64_t k = 0; k < w * c; k++) gaw[k] = 0.0f;
    for (int64_t i = 0; i < h; i++) {
        const float *gh = ah + i * c;
        float *gah_i = gah + i * c;
        for (int64_t k = 0; k < c; k++) gah_i[k] = 0.0f;
        for (int64_t j = 0; j < w; j++) {
            const int64_t at = (i * w + j) * c;
            const float *gw = aw + j * c;
            float *gaw_j = gaw + j * c;
            ca_prefetch_ahead(x, at, c, h * w * c, ahead);
            ca_prefetch_ahead(grad, at, c, h * w * c, ahead);
            for (int64_t k = 0; k < c; k++) {
                const float p = x[at + k] * grad[at + k];
                gah_i[k] += p * gw[k];
                gaw_j[k] += gh[k] * p;
                if (with_gx) gx[at + k] = grad[at + k] * gh[k] * gw[k];
            }
        }
    }
}

/* The backward of the pooling (in training ca_strips_nchw gives s (C, L) for a (C, H, W) sample,
 * ca_pool_nhwc (L, C) for an (H, W, C) one), grad_x written once: the pooling's gradient,
 * gs[h-strip] / W + gs[w-strip] / H broadcast, plus the gate product's, (grad * a_h) * a_w, when
 * `grad` is given. */
/* one channel plane of x's whole gradient (gated): short rows (lanes > 0) in whole vectors from each
 * row's start, the lanes past the row writing the next row's elements, which that row then
 * overwrites (stores over stores: no load waits on them); the rest, and long rows, a row at a time.
 * Written over the gradient (gxc == gc), those lanes would overwrite the next row's gradient before it
 * is read: the rows go through a buffer, CA_STAGED_ROWS at a time, as the product's do in place.
 * `aw_readable` and `gs_readable` floats from aw and gsc may be loaded. */
CA_INLINE void ca_strips_backward_plane(const float *gsc, const float *gc, const float *ah, const float *aw,
                                        float *gxc, int64_t h, int64_t w, const int64_t lanes, int64_t aw_readable,
                                        int64_t gs_readable) {
    const float inv_h = 1.0f / (float)h, inv_w = 1.0f / (float)w;
    const float *gsw = gsc + h;
    int64_t i = 0;
    if (lanes > 0) {
        const int in_place = gc == gxc && lanes != w;
        float aws[CA_SHORT_ROW], cols[CA_SHORT_ROW], staged[(CA_STAGED_ROWS + 1) * CA_SHORT_ROW];
        ca_row_of_lanes(aws, aw, 1.0f, w, lanes, aw_readable, 0.0f);
        ca_row_of_lanes(cols, gsw, inv_h, w, lanes, gs_readable - h, 0.0f);
        while (i * w + lanes <= h * w) {
            const int64_t first = i;
            float *dst = in_place ? staged : gxc + first * w;
            for (; (!in_place || i - first < CA_STAGED_ROWS) && i * w + lanes <= h * w; i++) {
                const float g = ah[i], bh = gsc[i] * inv_w, *gr = gc + i * w;
                float *gxr = dst + (i - first) * w;
#pragma omp simd
                for (int64_t k = 0; k < lanes; k++) gxr[k] = gr[k] * g * aws[k] + (bh + cols[k]);
            }
            if (in_place) memcpy(gxc + first * w, staged, (size_t)((i - first) * w) * sizeof(float));
        }
    }
    for (; i < h; i++) {
        const float g = ah[i], bh = gsc[i] * inv_w, *gr = gc + i * w;
        float *gxr = gxc + i * w;
        for (int64_t j = 0; j < w; j++) gxr[j] = gr[j] * g * aw[j] + (bh + gsw[j] * inv_h);
    }
}

CA_INLINE void ca_strips_backward_nchw(const float *gs, const float *grad, const float *ah, const float *aw,
                                       float *gx, int64_t c, int64_t h, int64_t w, const int gated) {
    const int64_t len = h + w;
    if (gated) {
#define CA_STRIPS_BACKWARD_CHANNELS(lanes) \
        for (int64_t ch = 0; ch < c; ch++) \
            ca_strips_backward_plane(gs + ch * len, grad + ch * h * w, ah + ch * h, aw + ch * w, gx + ch * h * w, \
                                     h, w, lanes, (c - ch) * w, (c - ch) * len)
        /* rows of 17-32 elements gained nothing this way */
        if (w <= 8) CA_STRIPS_BACKWARD_CHANNELS(8);
        else if (w <= 16) CA_STRIPS_BACKWARD_CHANNELS(16);
        else CA_STRIPS_BACKWARD_CHANNELS(0);
#undef CA_STRIPS_BACKWARD_CHANNELS
        return;
    }
    const float inv_h = 1.0f / (float)h, inv_w = 1.0f / (float)w;
    for (int64_t ch = 0; ch < c; ch++) {
        const float *gsc = gs + ch * len, *gsw = gsc + h;
        for (int64_t i = 0; i < h; i++) {
            const float bh = gsc[i] * inv_w;
            float *gxr = gx + (ch * h + i) * w;
            for (int64_t j = 0; j < w; j++) gxr[j] = bh + gsw[j] * inv_h;
        }
    }
}

CA_INLINE void ca_strips_backward_nhwc(const float *gs, const float *grad, const float *ah, const float *aw,
                                       float *gx, int64_t c, int64_t h, int64_t w, const int gated, int ahead) {
    const float inv_h = 1.0f / (float)h, inv_w = 1.0f / (float)w;
    for (int64_t i = 0; i < h; i++) {
        const float *gsh = gs + i * c;
        for (int64_t j = 0; j < w; j++) {
            const int64_t at = (i * w + j) * c;
            const float *gsw = gs + (h + j) * c;
            if (gated) {
                ca_prefetch_ahead(grad, at, c, h * w * c, ahead);
                const float *gh = ah + i * c, *gw = aw + j * c;
                for (int64_t k = 0; k < c; k++)
                    gx[at + k] = grad[at + k] * gh[k] * gw[k] + (gsh[k] * inv_w + gsw[k] * inv_h);
            } else {
                for (int64_t k = 0; k < c; k++) gx[at + k] = gsh[k] * inv_w + gsw[k] * inv_h;
            }
        }
    }
}

enum ca_op {
    CA_BLOCK, CA_GATE, CA_GATE_BACKWARD, CA_STRIPS, CA_STRIPS_BACKWARD,
    CA_MLP_CONV1, CA_MLP_GATES, CA_MLP_GATES_BACKWARD, CA_MLP_CONV1_BACKWARD
};

struct ca_job {
    enum ca_op op;
    const float *x, *w1, *b1, *wg, *bg; /* CA_BLOCK: the folded weights */
    const float *ah, *aw, *grad;        /* CA_GATE, CA_GATE_BACKWARD, CA_STRIPS_BACKWARD (grad: or NULL) */
    const float *gs;                    /* CA_STRIPS_BACKWARD: the strips' gradient */
    float *out, *gah, *gaw;             /* out: the output, the strips (CA_STRIPS) or grad_x (NULL: none) */
    /* CA_MLP_*: the MLP on the strips in training, see ca_run_mlp_conv1 */
    const float *grad_w;                /* CA_MLP_GATES_BACKWARD: a_w's gradient (grad: a_h's) */
    float *y1, *z, *hh, *gz;            /* (N, rd, L) each */
    float *out_w;                       /* CA_MLP_GATES: a_w (out: a_h) */
    float *partial;                     /* the weights' gradients, a row of partial_stride a thread */
    int64_t partial_stride;
    int64_t first, last, c, h, w, rd;   /* samples [first, last) */
    int channels_last, status;
    int ahead; /* x (N, C, H, W) of CA_AHEAD_MIN_BYTES or more: the channels_last training passes ask ahead */
    /* CA_BLOCK with fewer samples than threads: a team shares each sample, thread `rank` of `size`
     * taking a range of every step, with a barrier between steps and one workspace for all */
    int rank, size;
    int thread; /* this thread's number among those sharing the samples: its row of `partial` */
    void (*barrier)(void);
    float *workspace;
};

/* The workspace of a block: s, a (each C * L, the channels_last kernel's), t (C * lp, the contiguous
 * kernel's), y (rd * lp) and `parts` partial sums over H (each W * C, a channels_last team's);
 * cache-line aligned, so that the threads of a team, whose ranges start at multiples of 16
 * floats, never write to the same line. Each thread keeps its own, grown as needed and reused from
 * call to call: a fresh allocation of this size comes from new pages (mmap, or a heap trimmed in
 * between), whose faults cost as much as the block's arithmetic. */
#if defined(__GNUC__)
#define CA_THREAD_LOCAL __thread
#else
#define CA_THREAD_LOCAL _Thread_local
#endif
static CA_THREAD_LOCAL float *ca_thread_workspace;
static CA_THREAD_LOCAL size_t ca_thread_workspace_floats;
/* a key whose destructor frees a thread's workspace when the thread ends: threads come and go (a server's
 * thread per request, and with each caller thread its own OpenMP workers), thread-local variables are not freed */
static pthread_key_t ca_workspace_key;
static pthread_once_t ca_workspace_key_once = PTHREAD_ONCE_INIT;
static int ca_workspace_key_made; /* not when the process is out of keys: the workspaces then outlive threads */

static void ca_create_workspace_key(void) {
    ca_workspace_key_made = pthread_key_create(&ca_workspace_key, free) == 0;
}

static float *ca_workspace(int64_t c, int64_t h, int64_t w, int64_t rd, int parts) {
    const size_t floats = (size_t)((3 * c + rd) * (CA_ROUND8(h) + CA_ROUND8(w)) + parts * w * c);
    if (floats > ca_thread_workspace_floats) {
        void *buffer = NULL;
        pthread_once(&ca_workspace_key_once, ca_create_workspace_key);
        if (posix_memalign(&buffer, 64, floats * sizeof(float)) != 0) return NULL;
        if (ca_workspace_key_made && pthread_setspecific(ca_workspace_key, buffer) != 0) {
            free(buffer);
            return NULL;
        }
        free(ca_thread_workspace);
        ca_thread_workspace = (float *)buffer;
        ca_thread_workspace_floats = floats;
    }
    return ca_thread_workspace;
}

/* [*first, *last) of `rank`'s share of n items in `size` parts, bounds multiples of `align` (cache lines) */
static void ca_share(int64_t n, int size, int rank, int64_t align, int64_t *first, int64_t *last) {
    const int64_t units = (n + align - 1) / align;
    *first = units * rank / size * align;
    *last = units * (rank + 1) / size * align;
    if (*first > n) *first = n;
    if (*last > n) *last = n;
}

/* the means over H of channels [c0, c1): sums of the `parts` partial sums (W, C) at `partial`, into sw
 * (which may be `partial` itself); a part at a time, so that the loops run over channels, in vectors */
CA_INLINE void ca_sum_parts(const float *partial, float *sw, int parts, int64_t c, int64_t h, int64_t w,
                            int64_t c0, int64_t c1) {
    const float inv_h = 1.0f / (float)h;
    for (int64_t j = 0; j < w; j++) {
        float *out = sw + j * c;
        const float *first = partial + j * c;
        for (int64_t ch = c0; ch < c1; ch++) out[ch] = first[ch];
        for (int part = 1; part < parts; part++) {
            const float *more = partial + (part * w + j) * c;
            for (int64_t ch = c0; ch < c1; ch++) out[ch] += more[ch];
        }
        for (int64_t ch = c0; ch < c1; ch++) out[ch] *= inv_h;
    }
}

/* the block's weights this thread will read, asked for while it pools (GCC and clang; elsewhere not) */
CA_INLINE void ca_prefetch_range(const float *p, int64_t n) {
#if defined(__GNUC__)
    for (int64_t k = 0; k < n; k += 16) __builtin_prefetch(p + k, 0, 2);
#else
    (void)p;
    (void)n;
#endif
}

CA_INLINE void ca_prefetch_weights(const struct ca_job *job, int64_t c0, int64_t c1, int64_t r0, int64_t r1) {
    const int64_t c = job->c;
    ca_prefetch_range(job->w1 + r0 * c, (r1 - r0) * c);
    for (int64_t r = 0; r < job->rd; r++) {
        ca_prefetch_range(job->wg + r * 2 * c + c0, c1 - c0);
        ca_prefetch_range(job->wg + r * 2 * c + c + c0, c1 - c0);
    }
}

/* Each op runs in a function of its own for each layout (ca_kernels below), each with its clones: with
 * all of them inlined into one, a change to one op's loops moved the code generated for the others
 * (0.75-0.85x on unchanged loops, `python benchmarks/native_ab.py`), and the layouts take different
 * instruction sets (CA_TARGET_CLONES_WIDE). */
CA_INLINE void ca_block(struct ca_job *job, const int channels_last) {
    const int64_t c = job->c, h = job->h, w = job->w, rd = job->rd, len = h + w, size = c * h * w;
    float *buffer = job->workspace;
    if (buffer == NULL) {
        buffer = ca_workspace(c, h, w, rd, 0);
        if (buffer == NULL) {
            job->status = -1;
            return;
        }
    }
    const int64_t hp = CA_ROUND8(h), lp = hp + CA_ROUND8(w);
    float *s = buffer, *a = s + c * len, *t = a + c * len, *y = t + c * lp, *partial = y + rd * lp;
    /* a team shares channels, rows of the shared conv and, channels_last, rows of pixels (its
     * share of x and of the output then is one range of memory: channels would interleave them) */
    int64_t c0, c1, r0, r1, i0, i1;
    ca_share(c, job->size, job->rank, 16, &c0, &c1);
    ca_share(rd, job->size, job->rank, 4, &r0, &r1);
    ca_share(h, job->size, job->rank, 1, &i0, &i1);
    ca_prefetch_weights(job, c0, c1, r0, r1);
    for (int64_t b = job->first; b < job->last; b++) {
        const float *xb = job->x + b * size;
        float *ob = job->out + b * size;
        if (channels_last) {
            if (job->barrier) {
                ca_pool_nhwc(xb, s, partial + job->rank * w * c, c, w, i0, i1, size, 0);
                job->barrier();
                ca_sum_parts(partial, s + h * c, job->size, c, h, w, c0, c1);
            } else {
                ca_pool_nhwc(xb, s, s + h * c, c, w, 0, h, size, 0);
                ca_sum_parts(s + h * c, s + h * c, 1, c, h, w, 0, c);
            }
        } else {
            ca_strips_nchw(xb, t, lp, hp, c, h, w, c0, c1);
            for (int64_t ch = c0; ch < c1; ch++) { /* the zeros between the strips */
                float *tc = t + ch * lp;
                for (int64_t l = h; l < hp; l++) tc[l] = 0.0f;
                for (int64_t l = hp + w; l < lp; l++) tc[l] = 0.0f;
            }
        }
        if (job->barrier) job->barrier();
        if (channels_last)
            ca_conv1(s, y, c, len, len, job->w1, c, job->b1, r0, r1, 1);
        else
            ca_conv1_strips(t, y, c, lp, job->w1, job->b1, r0, r1);
        if (job->barrier) job->barrier();
        if (channels_last)
            ca_gate_convs(y, a, a + h * c, c, h, w, rd, job->wg, 2 * c, c, job->bg, c0, c1, 1);
        else /* into the rows of t this thread pooled: the strips are read by now (the barrier above) */
            ca_gate_strips(y, t, c, hp, lp, rd, job->wg, job->bg, c0, c1);
        /* no barrier after the product: the next sample's pooling writes only this thread's share of
         * s, t and the partial sums, and its conv1 waits for everyone to pass the next barrier */
        if (channels_last) {
            if (job->barrier) job->barrier();
            ca_product_nhwc(xb, ob, a, c, h, w, i0, i1);
        } else {
            ca_scale_planes(xb, ob, t, t + hp, lp, lp, h, w, c0, c1, c * lp - hp);
        }
    }
    job->status = 0;
}

CA_TARGET_CLONES
static void ca_run_block_nchw(struct ca_job *job) { ca_block(job, 0); }

CA_TARGET_CLONES_WIDE
static void ca_run_block_nhwc(struct ca_job *job) { ca_block(job, 1); }

CA_INLINE void ca_gate_job(struct ca_job *job, const int channels_last) {
    const int64_t c = job->c, h = job->h, w = job->w, size = c * h * w;
    for (int64_t b = job->first; b < job->last; b++) {
        const float *xb = job->x + b * size, *ah = job->ah + b * c * h, *aw = job->aw + b * c * w;
        if (channels_last)
            ca_gate_nhwc(xb, ah, aw, job->out + b * size, c, h, w);
        else
            ca_gate_nchw(xb, ah, aw, job->out + b * size, c, h, w);
    }
}

CA_TARGET_CLONES
static void ca_run_gate_nchw(struct ca_job *job) { ca_gate_job(job, 0); }

CA_TARGET_CLONES_WIDE
static void ca_run_gate_nhwc(struct ca_job *job) { ca_gate_job(job, 1); }

CA_INLINE void ca_gate_backward_job(struct ca_job *job, const int channels_last) {
    const int64_t c = job->c, h = job->h, w = job->w, size = c * h * w;
    for (int64_t b = job->first; b < job->last; b++) {
        const float *xb = job->x + b * size, *ah = job->ah + b * c * h, *aw = job->aw + b * c * w;
        const float *grad = job->grad + b * size;
        float *gah = job->gah + b * c * h, *gaw = job->gaw + b * c * w;
        /* constant with_gx in each call: two specialised copies of the loops */
        if (job->out == NULL) {
            if (channels_last)
                ca_gate_backward_nhwc(xb, ah, aw, grad, NULL, gah, gaw, c, h, w, 0, job->ahead);
            else
                ca_gate_backward_nchw(xb, ah, aw, grad, NULL, gah, gaw, c, h, w, 0);
        } else if (channels_last) {
            ca_gate_backward_nhwc(xb, ah, aw, grad, job->out + b * size, gah, gaw, c, h, w, 1, job->ahead);
        } else {
            ca_gate_backward_nchw(xb, ah, aw, grad, job->out + b * size, gah, gaw, c, h, w, 1);
        }
    }
}

CA_TARGET_CLONES
static void ca_run_gate_backward_nchw(struct ca_job *job) { ca_gate_backward_job(job, 0); }

CA_TARGET_CLONES_WIDE
static void ca_run_gate_backward_nhwc(struct ca_job *job) { ca_gate_backward_job(job, 1); }

CA_TARGET_CLONES
static void ca_run_strips_nchw(struct ca_job *job) {
    const int64_t c = job->c, h = job->h, w = job->w, size = c * h * w, len = h + w;
    for (int64_t b = job->first; b < job->last; b++)
        ca_strips_nchw(job->x + b * size, job->out + b * c * len, len, h, c, h, w, 0, c);
}

CA_TARGET_CLONES_WIDE
static void ca_run_strips_nhwc(struct ca_job *job) {
    const int64_t c = job->c, h = job->h, w = job->w, size = c * h * w, len = h + w;
    for (int64_t b = job->first; b < job->last; b++) { /* (L, C): the inference kernel's pooling */
        float *sb = job->out + b * c * len;
        ca_pool_nhwc(job->x + b * size, sb, sb + h * c, c, w, 0, h, size, job->ahead);
        ca_sum_parts(sb + h * c, sb + h * c, 1, c, h, w, 0, c);
    }
}

CA_INLINE void ca_strips_backward_job(struct ca_job *job, const int channels_last) {
    const int64_t c = job->c, h = job->h, w = job->w, size = c * h * w, len = h + w;
    for (int64_t b = job->first; b < job->last; b++) {
        const float *gsb = job->gs + b * c * len;
        float *gx = job->out + b * size;
        if (job->grad == NULL) {
            if (channels_last)
                ca_strips_backward_nhwc(gsb, NULL, NULL, NULL, gx, c, h, w, 0, 0);
            else
                ca_strips_backward_nchw(gsb, NULL, NULL, NULL, gx, c, h, w, 0);
        } else {
            const float *grad = job->grad + b * size, *ah = job->ah + b * c * h, *aw = job->aw + b * c * w;
            if (channels_last)
                ca_strips_backward_nhwc(gsb, grad, ah, aw, gx, c, h, w, 1, job->ahead);
            else
                ca_strips_backward_nchw(gsb, grad, ah, aw, gx, c, h, w, 1);
        }
    }
}

CA_TARGET_CLONES
static void ca_run_strips_backward_nchw(struct ca_job *job) { ca_strips_backward_job(job, 0); }

CA_TARGET_CLONES_WIDE
static void ca_run_strips_backward_nhwc(struct ca_job *job) { ca_strips_backward_job(job, 1); }

/* The MLP on the strips in training, a sample's strips s (L, C) at a time: y1 (rd, L) = conv1(s)
 * (CA_MLP_CONV1); then, with the norm's output z (batch statistics span samples: torch's batch norm
 * computes z between the calls), hh = hardswish(z) and the gates a_h (H, C), a_w (W, C) = sigmoid of
 * the gate convs of hh (CA_MLP_GATES). Backward: from the gates' gradients, the gradients of z and of
 * the gate convs' weights and biases (CA_MLP_GATES_BACKWARD); then, from y1's (torch's batch norm
 * backward), those of s and of conv1's weight and bias (CA_MLP_CONV1_BACKWARD). Weights as the
 * inference kernel takes them: w1 (rd, C), wg (rd, 2C) = [w_h^T | w_w^T], bg (2C). The weights'
 * gradients are sums over samples: each thread adds its samples' to its own row of `partial` (zeros,
 * a row for each thread asked for: the OpenMP runtime may start fewer), and ca_sum_rows adds the rows
 * into the first. */
CA_TARGET_CLONES_WIDE
static void ca_run_mlp_conv1(struct ca_job *job) {
    const int64_t c = job->c, len = job->h + job->w, rd = job->rd;
    for (int64_t b = job->first; b < job->last; b++)
        ca_conv1(job->x + b * len * c, job->y1 + b * rd * len, c, len, len, job->w1, c, job->b1, 0, rd, 0);
}

CA_TARGET_CLONES_WIDE
static void ca_run_mlp_gates(struct ca_job *job) {
    const int64_t c = job->c, h = job->h, w = job->w, len = h + w, rd = job->rd;
    for (int64_t b = job->first; b < job->last; b++) {
        const float *z = job->z + b * rd * len;
        float *hh = job->hh + b * rd * len;
#pragma omp simd
        for (int64_t k = 0; k < rd * len; k++) hh[k] = ca_hardswish(z[k]);
        ca_gate_convs(hh, job->out + b * h * c, job->out_w + b * w * c, c, h, w, rd, job->wg, 2 * c, c, job->bg, 0,
                      c, 1);
    }
}

/* partial row: [wg's gradient (rd x 2C) | bg's (2C)]; out: the gate convs' outputs' gradient (L, C) */
CA_TARGET_CLONES_WIDE
static void ca_run_mlp_gates_backward(struct ca_job *job) {
    const int64_t c = job->c, h = job->h, w = job->w, len = h + w, rd = job->rd;
    float *gwg = job->partial + job->thread * job->partial_stride, *gbg = gwg + rd * 2 * c;
    for (int64_t b = job->first; b < job->last; b++) {
        const float *z = job->z + b * rd * len, *hh = job->hh + b * rd * len;
        float *gp = job->out + b * len * c, *gz = job->gz + b * rd * len;
        for (int part = 0; part < 2; part++) { /* sigmoid's gradient, as torch's: grad * (1 - a) * a */
            const int64_t size = (part ? w : h) * c, at = part ? h * c : 0;
            const float *g = (part ? job->grad_w + b * w * c : job->grad + b * h * c);
            const float *a = (part ? job->aw + b * w * c : job->ah + b * h * c);
#pragma omp simd
            for (int64_t k = 0; k < size; k++) gp[at + k] = g[k] * (1.0f - a[k]) * a[k];
        }
        ca_conv1(gp, gz, c, h, len, job->wg, 2 * c, NULL, 0, rd, 0);
        ca_conv1(gp + h * c, gz + h, c, w, len, job->wg + c, 2 * c, NULL, 0, rd, 0);
#pragma omp simd
        for (int64_t k = 0; k < rd * len; k++) /* hard-swish's, as torch's */
            gz[k] = z[k] < -3.0f ? 0.0f : (z[k] <= 3.0f ? gz[k] * (z[k] / 3.0f + 0.5f) : gz[k]);
        ca_outer_sums(hh, len, gp, c, h, rd, gwg, 2 * c);
        ca_outer_sums(hh + h, len, gp + h * c, c, w, rd, gwg + c, 2 * c);
        for (int64_t l = 0; l < len; l++) {
            float *gb = gbg + (l < h ? 0 : c);
            const float *gl = gp + l * c;
#pragma omp simd
            for (int64_t k = 0; k < c; k++) gb[k] += gl[k];
        }
    }
}

/* gz: y1's gradient; partial row: [w1's gradient (rd x C) | b1's (rd)] */
CA_TARGET_CLONES_WIDE
static void ca_run_mlp_conv1_backward(struct ca_job *job) {
    const int64_t c = job->c, h = job->h, w = job->w, len = h + w, rd = job->rd;
    float *gw1 = job->partial + job->thread * job->partial_stride, *gb1 = gw1 + rd * c;
    for (int64_t b = job->first; b < job->last; b++) {
        const float *gy = job->gz + b * rd * len;
        float *gs = job->out + b * len * c;
        for (int64_t r = 0; r < rd; r++) {
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t l = 0; l < len; l++) sum += gy[r * len + l];
            gb1[r] += sum;
        }
        ca_gate_convs(gy, gs, gs + h * c, c, h, w, rd, job->w1, c, 0, NULL, 0, c, 0);
        ca_outer_sums(gy, len, job->x + b * len * c, c, len, rd, gw1, c);
    }
}

/* the partial rows of the threads that shared n samples (ca_split's) summed into the first */
static void ca_sum_rows(float *partial, int64_t width, int64_t n, int threads) {
    if (threads > CA_MAX_THREADS) threads = CA_MAX_THREADS;
    const int64_t rows = threads < n ? threads : n;
    for (int64_t i = 1; i < rows; i++)
        for (int64_t k = 0; k < width; k++) partial[k] += partial[i * width + k];
}

/* each op's kernel by layout (contiguous, channels_last) */
static void (*const ca_kernels[][2])(struct ca_job *) = {
    [CA_BLOCK] = {ca_run_block_nchw, ca_run_block_nhwc},
    [CA_GATE] = {ca_run_gate_nchw, ca_run_gate_nhwc},
    [CA_GATE_BACKWARD] = {ca_run_gate_backward_nchw, ca_run_gate_backward_nhwc},
    [CA_STRIPS] = {ca_run_strips_nchw, ca_run_strips_nhwc},
    [CA_STRIPS_BACKWARD] = {ca_run_strips_backward_nchw, ca_run_strips_backward_nhwc},
    /* (L, C) strips whatever the input's layout */
    [CA_MLP_CONV1] = {ca_run_mlp_conv1, ca_run_mlp_conv1},
    [CA_MLP_GATES] = {ca_run_mlp_gates, ca_run_mlp_gates},
    [CA_MLP_GATES_BACKWARD] = {ca_run_mlp_gates_backward, ca_run_mlp_gates_backward},
    [CA_MLP_CONV1_BACKWARD] = {ca_run_mlp_conv1_backward, ca_run_mlp_conv1_backward},
};

static void ca_run(struct ca_job *job) {
    ca_kernels[job->op][job->channels_last != 0](job);
    if (job->op != CA_BLOCK) /* the block sets its status */
        job->status = 0;
}

/* The threads: the OpenMP runtime torch has loaded (GNU's libgomp ABI, which LLVM's and Intel's
 * runtimes also export), found at run time, so the kernels share torch's pool of threads: they are
 * awake between torch's own parallel regions, where a new thread costs tens of microseconds and
 * competes with them for the cores. Without such a runtime, samples are split over pthreads. */
static struct {
    int resolved;
    void (*parallel)(void (*fn)(void *), void *data, unsigned threads, unsigned flags);
    void (*barrier)(void);
    int (*thread_num)(void);
    int (*num_threads)(void);
} ca_omp;

static void ca_resolve_omp(void) {
    if (ca_omp.resolved) return;
    ca_omp.resolved = 1;
#if defined(RTLD_DEFAULT)
    *(void **)&ca_omp.parallel = dlsym(RTLD_DEFAULT, "GOMP_parallel");
    *(void **)&ca_omp.barrier = dlsym(RTLD_DEFAULT, "GOMP_barrier");
    *(void **)&ca_omp.thread_num = dlsym(RTLD_DEFAULT, "omp_get_thread_num");
    *(void **)&ca_omp.num_threads = dlsym(RTLD_DEFAULT, "omp_get_num_threads");
    if (!ca_omp.barrier || !ca_omp.thread_num || !ca_omp.num_threads) ca_omp.parallel = NULL;
#endif
}

struct ca_parallel {
    struct ca_job base;
    int64_t n;
    int status;
};

static void ca_parallel_body(void *data) {
    struct ca_parallel *p = (struct ca_parallel *)data;
    struct ca_job job = p->base;
    const int rank = ca_omp.thread_num(), size = ca_omp.num_threads();
    if (job.workspace != NULL) {
        job.rank = rank;
        job.size = size;
        job.barrier = size > 1 ? ca_omp.barrier : NULL;
    } else {
        job.first = p->n * rank / size;
        job.last = p->n * (rank + 1) / size;
        job.thread = rank;
    }
    ca_run(&job);
    __atomic_or_fetch(&p->status, job.status, __ATOMIC_RELAXED);
}

static void *ca_thread(void *job) {
    ca_run((struct ca_job *)job); /* its workspace freed as it ends, by the key's destructor */
    return NULL;
}

/* samples over pthreads, this thread one of them */
static int ca_split_pthreads(struct ca_job base, int64_t n, int threads) {
    struct ca_job jobs[CA_MAX_THREADS];
    pthread_t ids[CA_MAX_THREADS];
    int started[CA_MAX_THREADS] = {0};
    for (int i = 0; i < threads; i++) {
        jobs[i] = base;
        jobs[i].first = n * i / threads;
        jobs[i].last = n * (i + 1) / threads;
        jobs[i].thread = i;
        jobs[i].status = -1;
    }
    for (int i = 1; i < threads; i++)
        started[i] = pthread_create(&ids[i], NULL, ca_thread, &jobs[i]) == 0;
    for (int i = 1; i < threads; i++)
        if (!started[i]) ca_run(&jobs[i]); /* no thread to be had: run it here */
    ca_run(&jobs[0]);
    int status = jobs[0].status;
    for (int i = 1; i < threads; i++) {
        if (started[i]) pthread_join(ids[i], NULL);
        status |= jobs[i].status;
    }
    return status;
}

/* n samples over up to `threads` threads; 0 on success */
static int ca_split(struct ca_job base, int64_t n, int threads) {
    if (threads > CA_MAX_THREADS) threads = CA_MAX_THREADS;
    const int team = ca_omp.parallel != NULL && base.op == CA_BLOCK && n < threads;
    if (!team && threads > n) threads = (int)n;
    base.first = 0;
    base.last = n;
    base.rank = 0;
    base.size = 1;
    base.thread = 0;
    if (threads <= 1) {
        ca_run(&base);
        return base.status;
    }
    if (ca_omp.parallel == NULL) return ca_split_pthreads(base, n, threads);
    if (team) {
        base.workspace = ca_workspace(base.c, base.h, base.w, base.rd, threads);
        if (base.workspace == NULL) return -1;
    }
    struct ca_parallel p = {.base = base, .n = n, .status = 0};
    ca_omp.parallel(ca_parallel_body, &p, (unsigned)threads, 0);
    return p.status;
}

static PyObject *ca_call(struct ca_job job, int64_t n, int threads) {
    int status;
    job.ahead = n * job.c * job.h * job.w * (int64_t)sizeof(float) >= CA_AHEAD_MIN_BYTES;
    ca_resolve_omp(); /* with the GIL held: once */
    Py_BEGIN_ALLOW_THREADS
    status = ca_split(job, n, threads);
    Py_END_ALLOW_THREADS
    if (status != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

#define CA_PTR(type, address) ((type *)(uintptr_t)(address))

static PyObject *forward(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long x, out, w1, b1, wg, bg;
    long long n, c, h, w, rd;
    int channels_last, threads;
    if (!PyArg_ParseTuple(args, "KKLLLLLKKKKpi", &x, &out, &n, &c, &h, &w, &rd, &w1, &b1, &wg, &bg,
                          &channels_last, &threads))
        return NULL;
    struct ca_job job = {
        .op = CA_BLOCK, .x = CA_PTR(const float, x), .out = CA_PTR(float, out),
        .w1 = CA_PTR(const float, w1), .b1 = CA_PTR(const float, b1),
        .wg = CA_PTR(const float, wg), .bg = CA_PTR(const float, bg),
        .c = c, .h = h, .w = w, .rd = rd, .channels_last = channels_last,
    };
    return ca_call(job, n, threads);
}

static PyObject *gate(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long x, ah, aw, out;
    long long n, c, h, w;
    int channels_last, threads;
    if (!PyArg_ParseTuple(args, "KKKKLLLLpi", &x, &ah, &aw, &out, &n, &c, &h, &w, &channels_last, &threads))
        return NULL;
    struct ca_job job = {
        .op = CA_GATE, .x = CA_PTR(const float, x), .ah = CA_PTR(const float, ah),
        .aw = CA_PTR(const float, aw), .out = CA_PTR(float, out),
        .c = c, .h = h, .w = w, .channels_last = channels_last,
    };
    return ca_call(job, n, threads);
}

static PyObject *gate_backward(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long x, ah, aw, grad, gx, gah, gaw;
    long long n, c, h, w;
    int channels_last, threads;
    if (!PyArg_ParseTuple(args, "KKKKKKKLLLLpi", &x, &ah, &aw, &grad, &gx, &gah, &gaw, &n, &c, &h, &w,
                          &channels_last, &threads))
        return NULL;
    struct ca_job job = {
        .op = CA_GATE_BACKWARD, .x = CA_PTR(const float, x), .ah = CA_PTR(const float, ah),
        .aw = CA_PTR(const float, aw), .grad = CA_PTR(const float, grad), .out = CA_PTR(float, gx),
        .gah = CA_PTR(float, gah), .gaw = CA_PTR(float, gaw),
        .c = c, .h = h, .w = w, .channels_last = channels_last,
    };
    return ca_call(job, n, threads);
}

static PyObject *strips(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long x, out;
    long long n, c, h, w;
    int channels_last, threads;
    if (!PyArg_ParseTuple(args, "KKLLLLpi", &x, &out, &n, &c, &h, &w, &channels_last, &threads)) return NULL;
    struct ca_job job = {
        .op = CA_STRIPS, .x = CA_PTR(const float, x), .out = CA_PTR(float, out),
        .c = c, .h = h, .w = w, .channels_last = channels_last,
    };
    return ca_call(job, n, threads);
}

static PyObject *strips_backward(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long gs, grad, ah, aw, gx;
    long long n, c, h, w;
    int channels_last, threads;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLpi", &gs, &grad, &ah, &aw, &gx, &n, &c, &h, &w, &channels_last, &threads))
        return NULL;
    struct ca_job job = {
        .op = CA_STRIPS_BACKWARD, .gs = CA_PTR(const float, gs), .grad = CA_PTR(const float, grad),
        .ah = CA_PTR(const float, ah), .aw = CA_PTR(const float, aw), .out = CA_PTR(float, gx),
        .c = c, .h = h, .w = w, .channels_last = channels_last,
    };
    return ca_call(job, n, threads);
}

static PyObject *mlp_conv1(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long s, y1, w1, b1;
    long long n, c, h, w, rd;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKLLLLLi", &s, &y1, &w1, &b1, &n, &c, &h, &w, &rd, &threads)) return NULL;
    struct ca_job job = {
        .op = CA_MLP_CONV1, .x = CA_PTR(const float, s), .y1 = CA_PTR(float, y1),
        .w1 = CA_PTR(const float, w1), .b1 = CA_PTR(const float, b1), .c = c, .h = h, .w = w, .rd = rd,
    };
    return ca_call(job, n, threads);
}

static PyObject *mlp_gates(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long z, hh, a_h, a_w, wg, bg;
    long long n, c, h, w, rd;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKKLLLLLi", &z, &hh, &a_h, &a_w, &wg, &bg, &n, &c, &h, &w, &rd, &threads))
        return NULL;
    struct ca_job job = {
        .op = CA_MLP_GATES, .z = CA_PTR(float, z), .hh = CA_PTR(float, hh), .out = CA_PTR(float, a_h),
        .out_w = CA_PTR(float, a_w), .wg = CA_PTR(const float, wg), .bg = CA_PTR(const float, bg),
        .c = c, .h = h, .w = w, .rd = rd,
    };
    return ca_call(job, n, threads);
}

static PyObject *mlp_call_summed(struct ca_job job, int64_t n, int threads) {
    PyObject *result = ca_call(job, n, threads);
    if (result != NULL) ca_sum_rows(job.partial, job.partial_stride, n, threads);
    return result;
}

static PyObject *mlp_gates_backward(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long grad_a_h, grad_a_w, a_h, a_w, z, hh, wg, grad_p, gz, partial;
    long long n, c, h, w, rd;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKKLLLLLi", &grad_a_h, &grad_a_w, &a_h, &a_w, &z, &hh, &wg, &grad_p, &gz,
                          &partial, &n, &c, &h, &w, &rd, &threads))
        return NULL;
    struct ca_job job = {
        .op = CA_MLP_GATES_BACKWARD, .grad = CA_PTR(const float, grad_a_h), .grad_w = CA_PTR(const float, grad_a_w),
        .ah = CA_PTR(const float, a_h), .aw = CA_PTR(const float, a_w), .z = CA_PTR(float, z),
        .hh = CA_PTR(float, hh), .wg = CA_PTR(const float, wg), .out = CA_PTR(float, grad_p),
        .gz = CA_PTR(float, gz), .partial = CA_PTR(float, partial), .partial_stride = rd * 2 * c + 2 * c,
        .c = c, .h = h, .w = w, .rd = rd,
    };
    return mlp_call_summed(job, n, threads);
}

static PyObject *mlp_conv1_backward(PyObject *Py_UNUSED(self), PyObject *args) {
    unsigned long long grad_y1, s, w1, grad_s, partial;
    long long n, c, h, w, rd;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLLi", &grad_y1, &s, &w1, &grad_s, &partial, &n, &c, &h, &w, &rd, &threads))
        return NULL;
    struct ca_job job = {
        .op = CA_MLP_CONV1_BACKWARD, .gz = CA_PTR(float, grad_y1), .x = CA_PTR(const float, s),
        .w1 = CA_PTR(const float, w1), .out = CA_PTR(float, grad_s), .partial = CA_PTR(float, partial),
        .partial_stride = rd * c + rd, .c = c, .h = h, .w = w, .rd = rd,
    };
    return mlp_call_summed(job, n, threads);
}

static PyObject *threading(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args)) {
    ca_resolve_omp();
    return PyUnicode_FromString(ca_omp.parallel != NULL ? "openmp" : "pthreads");
}

static PyMethodDef methods[] = {
    {"threading", threading, METH_NOARGS,
     "threading(): 'openmp' where the kernels run in the threads of the OpenMP runtime torch has loaded, "
     "else 'pthreads' (samples only: a sample is never split)"},
    {"forward", forward, METH_VARARGS,
     "forward(x, out, n, c, h, w, rd, w1, b1, w_gates_t, b_gates, channels_last, threads): CA inference "
     "on float32 data pointers (0 for a missing bias), samples split over up to `threads` threads"},
    {"gate", gate, METH_VARARGS,
     "gate(x, a_h, a_w, out, n, c, h, w, channels_last, threads): out = x * a_h * a_w"},
    {"gate_backward", gate_backward, METH_VARARGS,
     "gate_backward(x, a_h, a_w, grad, grad_x, grad_a_h, grad_a_w, n, c, h, w, channels_last, threads): "
     "the gradients of x * a_h * a_w (grad_x 0: that of a_h and a_w only)"},
    {"strips", strips, METH_VARARGS,
     "strips(x, out, n, c, h, w, channels_last, threads): the mean over W and the mean over H side by side, "
     "(N, C, H + W), channels_last: (N, H + W, C)"},
    {"strips_backward", strips_backward, METH_VARARGS,
     "strips_backward(grad_strips, grad, a_h, a_w, grad_x, n, c, h, w, channels_last, threads): grad_x of "
     "the strips, plus (grad * a_h) * a_w where grad is not 0 (grad_x may be grad: written over it)"},
    {"mlp_conv1", mlp_conv1, METH_VARARGS,
     "mlp_conv1(s, y1, w1, b1, n, c, h, w, rd, threads): y1 (N, rd, L) = conv1 of the strips s (N, L, C)"},
    {"mlp_gates", mlp_gates, METH_VARARGS,
     "mlp_gates(z, hh, a_h, a_w, w_gates_t, b_gates, n, c, h, w, rd, threads): hh = hardswish(z), the gates "
     "a_h (N, H, C) and a_w (N, W, C) = sigmoid of the gate convs of hh"},
    {"mlp_gates_backward", mlp_gates_backward, METH_VARARGS,
     "mlp_gates_backward(grad_a_h, grad_a_w, a_h, a_w, z, hh, w_gates_t, grad_p, grad_z, partial, n, c, h, w, "
     "rd, threads): grad_z, and the gate convs' weight and bias gradients in partial's first row (grad_p (N, "
     "L, C): the gate convs' outputs' gradient)"},
    {"mlp_conv1_backward", mlp_conv1_backward, METH_VARARGS,
     "mlp_conv1_backward(grad_y1, s, w1, grad_s, partial, n, c, h, w, rd, threads): the strips' gradient "
     "grad_s (N, L, C), conv1's weight and bias gradients in partial's first row"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_native", .m_doc = NULL, .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
