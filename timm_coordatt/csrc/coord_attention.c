/* Coordinate Attention on the CPU in float32: inference in one pass over the block, and the gate
 * product of training with its backward.
 *
 * The PyTorch formulation runs a dozen small ops a block; at the sizes of a mobile network's
 * blocks (rows of 7-56 elements, GEMMs of a few thousand multiply-adds) their fixed costs
 * dominate. Here the same arithmetic runs as plain loops that the compiler vectorises: pool both
 * strips, the shared 1x1 conv (BN folded in) with hard-swish, the two gate convs with sigmoid,
 * and the product, reading the input twice and writing the output once.
 *
 * Samples are split over threads (as many as torch uses), each with its own workspace.
 * Called from timm_coordatt/native.py, which checks dtypes, devices, shapes and memory formats;
 * pointers come in as integers (no torch headers, so building needs only a C compiler).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CA_MAX_THREADS 64
#define CA_CHANNEL_BLOCK 64

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
/* an AVX2/FMA version next to the baseline one, picked when the module loads */
#define CA_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CA_TARGET_CLONES
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
    const int32_t bits = (k_bits - shifter_bits + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

CA_INLINE float ca_hardswish(float v) {
    float r = v + 3.0f;
    r = r < 0.0f ? 0.0f : (r > 6.0f ? 6.0f : r);
    return v * r / 6.0f;
}

/* The strips and gates are kept as (L, C) rows, L = H + W, so that every loop over channels runs
 * over contiguous memory: y (rd, L) = hardswish(w1 (rd, C) @ s + b1) takes dot products of length C,
 * and the gates a (L, C) = sigmoid(y^T @ wg + bg), wg (rd, 2C) = [w_h^T | w_w^T], axpys of length C. */
CA_INLINE void ca_gates(const float *s, float *y, float *a, int64_t c, int64_t h, int64_t w, int64_t rd,
                        const float *w1, const float *b1, const float *wg, const float *bg) {
    const int64_t len = h + w;
    /* four rows of w1 at a time: four independent sums, each element of s loaded once for them */
    int64_t r = 0;
    for (; r + 4 <= rd; r += 4) {
        const float *w0 = w1 + r * c, *w1r = w0 + c, *w2 = w1r + c, *w3 = w2 + c;
        for (int64_t l = 0; l < len; l++) {
            const float *sl = s + l * c;
            float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f, acc3 = 0.0f;
#pragma omp simd reduction(+ : acc0, acc1, acc2, acc3)
            for (int64_t ch = 0; ch < c; ch++) {
                acc0 += w0[ch] * sl[ch];
                acc1 += w1r[ch] * sl[ch];
                acc2 += w2[ch] * sl[ch];
                acc3 += w3[ch] * sl[ch];
            }
            y[r * len + l] = ca_hardswish(acc0 + (b1 ? b1[r] : 0.0f));
            y[(r + 1) * len + l] = ca_hardswish(acc1 + (b1 ? b1[r + 1] : 0.0f));
            y[(r + 2) * len + l] = ca_hardswish(acc2 + (b1 ? b1[r + 2] : 0.0f));
            y[(r + 3) * len + l] = ca_hardswish(acc3 + (b1 ? b1[r + 3] : 0.0f));
        }
    }
    for (; r < rd; r++) {
        const float *wr = w1 + r * c;
        for (int64_t l = 0; l < len; l++) {
            const float *sl = s + l * c;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t ch = 0; ch < c; ch++) acc += wr[ch] * sl[ch];
            y[r * len + l] = ca_hardswish(acc + (b1 ? b1[r] : 0.0f));
        }
    }
    for (int64_t l = 0; l < len; l++) {
        const int64_t offset = l < h ? 0 : c; /* w_h^T or w_w^T */
        float *al = a + l * c;
        for (int64_t ch = 0; ch < c; ch++) al[ch] = bg ? bg[offset + ch] : 0.0f;
        int64_t r = 0;
        for (; r + 4 <= rd; r += 4) { /* four rows a pass: al loaded and stored once for them */
            const float v0 = y[r * len + l], v1 = y[(r + 1) * len + l];
            const float v2 = y[(r + 2) * len + l], v3 = y[(r + 3) * len + l];
            const float *w0 = wg + r * 2 * c + offset, *w1r = w0 + 2 * c, *w2 = w1r + 2 * c, *w3 = w2 + 2 * c;
            for (int64_t ch = 0; ch < c; ch++) al[ch] += v0 * w0[ch] + v1 * w1r[ch] + v2 * w2[ch] + v3 * w3[ch];
        }
        for (; r < rd; r++) {
            const float v = y[r * len + l];
            const float *wr = wg + r * 2 * c + offset;
            for (int64_t ch = 0; ch < c; ch++) al[ch] += v * wr[ch];
        }
    }
    for (int64_t i = 0; i < len * c; i++) a[i] = 1.0f / (1.0f + ca_exp(-a[i]));
}

/* one sample, (C, H, W) contiguous; s, a: (H + W, C), y: (rd, H + W), t: (C, H + W) */
CA_INLINE void ca_sample_nchw(const float *x, float *out, float *s, float *y, float *a, float *t,
                              int64_t c, int64_t h, int64_t w, int64_t rd,
                              const float *w1, const float *b1, const float *wg, const float *bg) {
    const int64_t len = h + w;
    const float inv_h = 1.0f / (float)h, inv_w = 1.0f / (float)w;
    for (int64_t ch = 0; ch < c; ch++) {
        const float *xc = x + ch * h * w;
        float *col = t + ch * len + h;
        for (int64_t j = 0; j < w; j++) col[j] = 0.0f;
        for (int64_t i = 0; i < h; i++) {
            const float *row = xc + i * w;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t j = 0; j < w; j++) {
                acc += row[j];
                col[j] += row[j];
            }
            s[i * c + ch] = acc * inv_w;
        }
        for (int64_t j = 0; j < w; j++) s[(h + j) * c + ch] = col[j] * inv_h;
    }
    ca_gates(s, y, a, c, h, w, rd, w1, b1, wg, bg);
    for (int64_t l = 0; l < len; l++)
        for (int64_t ch = 0; ch < c; ch++) t[ch * len + l] = a[l * c + ch];
    for (int64_t ch = 0; ch < c; ch++) {
        const float *xc = x + ch * h * w, *ah = t + ch * len, *aw = ah + h;
        float *oc = out + ch * h * w;
        for (int64_t i = 0; i < h; i++) {
            const float g = ah[i];
            const float *row = xc + i * w;
            float *orow = oc + i * w;
            for (int64_t j = 0; j < w; j++) orow[j] = row[j] * g * aw[j];
        }
    }
}

/* one sample, (H, W, C) contiguous (a channels_last NCHW tensor); s, a: (H + W, C), y: (rd, H + W) */
CA_INLINE void ca_sample_nhwc(const float *x, float *out, float *s, float *y, float *a,
                              int64_t c, int64_t h, int64_t w, int64_t rd,
                              const float *w1, const float *b1, const float *wg, const float *bg) {
    const int64_t len = h + w;
    const float inv_h = 1.0f / (float)h, inv_w = 1.0f / (float)w;
    memset(s, 0, (size_t)(len * c) * sizeof(float));
    for (int64_t i = 0; i < h; i++) {
        for (int64_t j = 0; j < w; j++) {
            const float *px = x + (i * w + j) * c;
            float *sh = s + i * c, *sw = s + (h + j) * c;
            for (int64_t ch = 0; ch < c; ch++) {
                sh[ch] += px[ch];
                sw[ch] += px[ch];
            }
        }
    }
    for (int64_t l = 0; l < len; l++) {
        const float scale = l < h ? inv_w : inv_h;
        for (int64_t ch = 0; ch < c; ch++) s[l * c + ch] *= scale;
    }
    ca_gates(s, y, a, c, h, w, rd, w1, b1, wg, bg);
    for (int64_t i = 0; i < h; i++) {
        for (int64_t j = 0; j < w; j++) {
            const float *px = x + (i * w + j) * c, *gh = a + i * c, *gw = a + (h + j) * c;
            float *po = out + (i * w + j) * c;
            for (int64_t ch = 0; ch < c; ch++) po[ch] = px[ch] * gh[ch] * gw[ch];
        }
    }
}

/* The product y = x * a_h * a_w for training (PyTorch's rounding: (x * a_h) * a_w, so autograd's
 * recomputation with torch ops rebuilds the same bits), and its backward in one pass:
 * grad_x = (g * a_h) * a_w, grad_a_h = sum_w x * g * a_w, grad_a_w = sum_h x * g * a_h.
 * One sample; NCHW: a_h (C, H), a_w (C, W); NHWC: a_h (H, C), a_w (W, C). */
CA_INLINE void ca_gate_nchw(const float *x, const float *ah, const float *aw, float *out,
                            int64_t c, int64_t h, int64_t w) {
    for (int64_t ch = 0; ch < c; ch++) {
        for (int64_t i = 0; i < h; i++) {
            const float g = ah[ch * h + i];
            const float *row = x + (ch * h + i) * w, *gw = aw + ch * w;
            float *orow = out + (ch * h + i) * w;
            for (int64_t j = 0; j < w; j++) orow[j] = row[j] * g * gw[j];
        }
    }
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

CA_INLINE void ca_gate_backward_nchw(const float *x, const float *ah, const float *aw, const float *grad,
                                     float *gx, float *gah, float *gaw, int64_t c, int64_t h, int64_t w) {
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
                                     float *gx, float *gah, float *gaw, int64_t c, int64_t h, int64_t w) {
    /* channel blocks small enough that a row's sums and the W rows of grad_a_w stay in L1 */
    for (int64_t c0 = 0; c0 < c; c0 += CA_CHANNEL_BLOCK) {
        const int64_t cb = c - c0 < CA_CHANNEL_BLOCK ? c - c0 : CA_CHANNEL_BLOCK;
        for (int64_t j = 0; j < w; j++)
            for (int64_t k = 0; k < cb; k++) gaw[j * c + c0 + k] = 0.0f;
        for (int64_t i = 0; i < h; i++) {
            float acc[CA_CHANNEL_BLOCK] = {0.0f};
            const float *gh = ah + i * c + c0;
            for (int64_t j = 0; j < w; j++) {
                const int64_t at = (i * w + j) * c + c0;
                const float *gw = aw + j * c + c0;
                float *gaw_j = gaw + j * c + c0;
                for (int64_t k = 0; k < cb; k++) {
                    const float p = x[at + k] * grad[at + k];
                    acc[k] += p * gw[k];
                    gaw_j[k] += gh[k] * p;
                    gx[at + k] = grad[at + k] * gh[k] * gw[k];
                }
            }
            for (int64_t k = 0; k < cb; k++) gah[i * c + c0 + k] = acc[k];
        }
    }
}

enum ca_op { CA_BLOCK, CA_GATE, CA_GATE_BACKWARD };

struct ca_job {
    enum ca_op op;
    const float *x, *w1, *b1, *wg, *bg; /* CA_BLOCK: the folded weights */
    const float *ah, *aw, *grad;        /* CA_GATE, CA_GATE_BACKWARD */
    float *out, *gah, *gaw;             /* out: the output, or grad_x */
    int64_t first, last, c, h, w, rd;
    int channels_last, status;
};

CA_TARGET_CLONES
static void ca_run(struct ca_job *job) {
    const int64_t c = job->c, h = job->h, w = job->w, rd = job->rd, len = h + w, size = c * h * w;
    float *buffer = NULL;
    if (job->op == CA_BLOCK) {
        buffer = (float *)malloc((size_t)(3 * c * len + rd * len) * sizeof(float));
        if (buffer == NULL) {
            job->status = -1;
            return;
        }
    }
    for (int64_t b = job->first; b < job->last; b++) {
        const float *xb = job->x + b * size;
        float *ob = job->out + b * size;
        if (job->op == CA_BLOCK) {
            float *s = buffer, *a = s + c * len, *t = a + c * len, *y = t + c * len;
            if (job->channels_last)
                ca_sample_nhwc(xb, ob, s, y, a, c, h, w, rd, job->w1, job->b1, job->wg, job->bg);
            else
                ca_sample_nchw(xb, ob, s, y, a, t, c, h, w, rd, job->w1, job->b1, job->wg, job->bg);
        } else if (job->op == CA_GATE) {
            if (job->channels_last)
                ca_gate_nhwc(xb, job->ah + b * c * h, job->aw + b * c * w, ob, c, h, w);
            else
                ca_gate_nchw(xb, job->ah + b * c * h, job->aw + b * c * w, ob, c, h, w);
        } else {
            if (job->channels_last)
                ca_gate_backward_nhwc(xb, job->ah + b * c * h, job->aw + b * c * w, job->grad + b * size, ob,
                                      job->gah + b * c * h, job->gaw + b * c * w, c, h, w);
            else
                ca_gate_backward_nchw(xb, job->ah + b * c * h, job->aw + b * c * w, job->grad + b * size, ob,
                                      job->gah + b * c * h, job->gaw + b * c * w, c, h, w);
        }
    }
    free(buffer);
    job->status = 0;
}

static void *ca_thread(void *job) {
    ca_run((struct ca_job *)job);
    return NULL;
}

/* samples split over up to `threads` threads (this one included); 0 on success */
static int ca_split(struct ca_job base, int64_t n, int threads) {
    if (threads > CA_MAX_THREADS) threads = CA_MAX_THREADS;
    if (threads > n) threads = (int)n;
    if (threads < 1) threads = 1;
    struct ca_job jobs[CA_MAX_THREADS];
    pthread_t ids[CA_MAX_THREADS];
    int started[CA_MAX_THREADS] = {0};
    for (int i = 0; i < threads; i++) {
        jobs[i] = base;
        jobs[i].first = n * i / threads;
        jobs[i].last = n * (i + 1) / threads;
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

static PyObject *ca_call(struct ca_job job, int64_t n, int threads) {
    int status;
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

static PyMethodDef methods[] = {
    {"forward", forward, METH_VARARGS,
     "forward(x, out, n, c, h, w, rd, w1, b1, w_gates_t, b_gates, channels_last, threads): CA inference "
     "on float32 data pointers (0 for a missing bias), samples split over up to `threads` threads"},
    {"gate", gate, METH_VARARGS,
     "gate(x, a_h, a_w, out, n, c, h, w, channels_last, threads): out = x * a_h * a_w"},
    {"gate_backward", gate_backward, METH_VARARGS,
     "gate_backward(x, a_h, a_w, grad, grad_x, grad_a_h, grad_a_w, n, c, h, w, channels_last, threads): "
     "the gradients of x * a_h * a_w"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_native", .m_doc = NULL, .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
