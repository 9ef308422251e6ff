/*
 * The compiled core of densemtl's boundary evaluation (densemtl.metrics._boundary_core).
 *
 * Three kernels, called from densemtl/metrics/edge_nms.py and densemtl/metrics/boundary_match.py,
 * which prepare contiguous numpy arrays and document the semantics:
 *
 *   nms(edges, orientation, out, radius, border, multiplier)
 *       edge non-maximum suppression in single precision, with the semantics of the structured-edges
 *       toolbox's edgesNmsMex (bilinear samples along the normal, conservative multiplier, linear
 *       attenuation of a border band);
 *   thin_levels(order, ends, height, width) -> (pixels, offsets)
 *       morphological thinning (MATLAB bwmorph 'thin', Inf) of the pixel sets order[:ends[k]], each
 *       returned as flat indices (in the order of `order`);
 *   match_levels(pixels, offsets, gt, height, width, radius) -> sizes
 *       the size of a maximum one-to-one matching between each predicted set and the ground-truth
 *       pixels within `radius`, all sets answered by one incremental matching.
 *
 * Only the CPython C API is used (arrays are read through the buffer protocol): no numpy headers are
 * needed at build time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define _USE_MATH_DEFINES
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------------ */
/* Buffers                                                                                          */

typedef struct {
    Py_buffer view;
    int held;
} Buffer;

/* A C-contiguous buffer of `count` items of `itemsize` bytes and numpy kind `kind` ('f', 'i', 'u'). */
static int get_buffer(PyObject *obj, Buffer *buf, char kind, Py_ssize_t itemsize, int writable, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    buf->held = 0;
    if (PyObject_GetBuffer(obj, &buf->view, flags) < 0) {
        return -1;
    }
    buf->held = 1;
    const char *format = buf->view.format ? buf->view.format : "B";
    if (*format == '<' || *format == '=' || *format == '@') {
        format++;
    }
    char found = 0;
    switch (*format) {
        case 'f': case 'd': found = 'f'; break;
        case 'b': case 'h': case 'i': case 'l': case 'q': case 'n': found = 'i'; break;
        case 'B': case 'H': case 'I': case 'L': case 'Q': case 'N': case '?': found = 'u'; break;
        default: found = 0;
    }
    if (found != kind || buf->view.itemsize != itemsize) {
        PyErr_Format(PyExc_TypeError, "%s: expected a contiguous array of %c%zd items, got format '%s'",
                     name, kind, itemsize * 8, buf->view.format ? buf->view.format : "B");
        return -1;
    }
    return 0;
}

static void release(Buffer *buf) {
    if (buf->held) {
        PyBuffer_Release(&buf->view);
        buf->held = 0;
    }
}

static Py_ssize_t item_count(const Buffer *buf) { return buf->view.len / buf->view.itemsize; }

/* A new 1-D array of int64 owned by a bytearray, returned as a memoryview cast to 'q'. */
static PyObject *int64_array(const int64_t *data, Py_ssize_t count) {
    PyObject *bytes = PyByteArray_FromStringAndSize((const char *)data, (Py_ssize_t)(count * sizeof(int64_t)));
    if (bytes == NULL) {
        return NULL;
    }
    PyObject *view = PyMemoryView_FromObject(bytes);
    Py_DECREF(bytes);
    if (view == NULL) {
        return NULL;
    }
    PyObject *cast = PyObject_CallMethod(view, "cast", "s", "q");
    Py_DECREF(view);
    return cast;
}

/* ------------------------------------------------------------------------------------------------ */
/* Triangle smoothing, orientation and edge non-maximum suppression                                 */

/* Parse (image, out, height, width) with float32 buffers of height x width items. */
static int image_pair(PyObject *image_obj, PyObject *out_obj, int h, int w, Buffer *image_buf, Buffer *out_buf,
                      const char *name) {
    if (get_buffer(image_obj, image_buf, 'f', 4, 0, name) < 0 || get_buffer(out_obj, out_buf, 'f', 4, 1, "out") < 0) {
        return -1;
    }
    Py_ssize_t n = (Py_ssize_t)h * w;
    if (h < 1 || w < 1 || item_count(image_buf) != n || item_count(out_buf) != n) {
        PyErr_Format(PyExc_ValueError, "%s: arrays must hold height x width items", name);
        return -1;
    }
    return 0;
}

/* Index i reflected into [0, n) with the edge sample repeated (... b a | a b ... y z | z y ...). */
static inline Py_ssize_t reflect(Py_ssize_t i, Py_ssize_t n) {
    for (;;) {
        if (i < 0) {
            i = -i - 1;
        } else if (i >= n) {
            i = 2 * n - i - 1;
        } else {
            return i;
        }
    }
}

/* convTri: the triangle filter [1 .. r+1 .. 1] / (r+1)^2 along the columns, then along the rows, with
 * symmetric padding; sums in double. */
static int conv_tri(const float *image, float *out, int h, int w, int r) {
    Py_ssize_t n = (Py_ssize_t)h * w;
    double norm = 1.0 / ((double)(r + 1) * (r + 1));
    double *acc = malloc((size_t)w * sizeof(double));
    double *line = malloc((size_t)(w + 2 * r) * sizeof(double));
    float *tmp = malloc((size_t)n * sizeof(float));
    if (!acc || !line || !tmp) {
        free(acc);
        free(line);
        free(tmp);
        return -1;
    }
    for (int y = 0; y < h; y++) { /* axis 0: whole rows weighted together */
        const float *centre = image + (Py_ssize_t)y * w;
        for (int x = 0; x < w; x++) {
            acc[x] = (double)(r + 1) * centre[x];
        }
        for (int d = 1; d <= r; d++) {
            const float *above = image + reflect(y - d, h) * w, *below = image + reflect(y + d, h) * w;
            for (int x = 0; x < w; x++) {
                acc[x] += (double)(r + 1 - d) * ((double)above[x] + (double)below[x]);
            }
        }
        for (int x = 0; x < w; x++) {
            tmp[(Py_ssize_t)y * w + x] = (float)(acc[x] * norm);
        }
    }
    for (int y = 0; y < h; y++) { /* axis 1: each row padded, then filtered */
        const float *row = tmp + (Py_ssize_t)y * w;
        for (int x = -r; x < w + r; x++) {
            line[x + r] = row[reflect(x, w)];
        }
        for (int x = 0; x < w; x++) {
            const double *c = line + x + r;
            double sum = (double)(r + 1) * c[0];
            for (int d = 1; d <= r; d++) {
                sum += (double)(r + 1 - d) * (c[-d] + c[d]);
            }
            out[(Py_ssize_t)y * w + x] = (float)(sum * norm);
        }
    }
    free(acc);
    free(line);
    free(tmp);
    return 0;
}

/* numpy.gradient of a row-major map along x (axis 1) or y (axis 0): central differences, one-sided at the
 * ends. */
static void gradient(const float *in, float *out, int h, int w, int along_x) {
    for (int y = 0; y < h; y++) {
        for (int x = 0; x < w; x++) {
            Py_ssize_t i = (Py_ssize_t)y * w + x;
            int pos = along_x ? x : y, n = along_x ? w : h;
            Py_ssize_t step = along_x ? 1 : w;
            if (n < 2) {
                out[i] = 0;
            } else if (pos == 0) {
                out[i] = in[i + step] - in[i];
            } else if (pos == n - 1) {
                out[i] = in[i] - in[i - step];
            } else {
                out[i] = (in[i + step] - in[i - step]) / 2.0f;
            }
        }
    }
}

/* Orientation in [0, pi) from second derivatives of convTri(E, r): mod(atan(Oyy sign(-Oxy) / (Oxx + 1e-5)), pi),
 * 0 where undefined. */
static int orientation(const float *edges, float *out, int h, int w, int r) {
    Py_ssize_t n = (Py_ssize_t)h * w;
    float *smooth = malloc((size_t)n * 5 * sizeof(float));
    if (!smooth || conv_tri(edges, smooth, h, w, r) < 0) {
        free(smooth);
        return -1;
    }
    float *ox = smooth + n, *oy = smooth + 2 * n, *oxx = smooth + 3 * n, *oyy = smooth + 4 * n;
    gradient(smooth, ox, h, w, 1);
    gradient(smooth, oy, h, w, 0);
    gradient(ox, oxx, h, w, 1);
    gradient(oy, oyy, h, w, 0);
    float *oxy = ox; /* Ox is no longer needed */
    gradient(oy, oxy, h, w, 1);
    const float pi = (float)M_PI;
    for (Py_ssize_t i = 0; i < n; i++) {
        float sign = oxy[i] < 0 ? 1.0f : (oxy[i] > 0 ? -1.0f : 0.0f);
        float angle = atanf(oyy[i] * sign / (oxx[i] + 1e-5f));
        if (angle != angle) {
            angle = 0;
        } else if (angle < 0) {
            angle += pi;
        }
        out[i] = angle;
    }
    free(smooth);
    return 0;
}

/* (image, out, height, width, radius) -> None: `fn` of a float32 map into `out`. */
static PyObject *map_function(PyObject *args, int (*fn)(const float *, float *, int, int, int), const char *name) {
    PyObject *image_obj, *out_obj;
    int h, w, r;
    if (!PyArg_ParseTuple(args, "OOiii", &image_obj, &out_obj, &h, &w, &r)) {
        return NULL;
    }
    Buffer image_buf = {.held = 0}, out_buf = {.held = 0};
    PyObject *result = NULL;
    if (image_pair(image_obj, out_obj, h, w, &image_buf, &out_buf, name) < 0) {
        goto done;
    }
    if (r < 1) {
        PyErr_Format(PyExc_ValueError, "%s: radius must be at least 1", name);
        goto done;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = fn(image_buf.view.buf, out_buf.view.buf, h, w, r);
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    release(&image_buf);
    release(&out_buf);
    return result;
}

static PyObject *py_conv_tri(PyObject *self, PyObject *args) { return map_function(args, conv_tri, "conv_tri"); }

static PyObject *py_orientation(PyObject *self, PyObject *args) { return map_function(args, orientation, "orientation"); }

/* Bilinear sample of the row-major h x w image at (x, y), coordinates clamped as the MEX kernel does. */
static inline float interp(const float *image, int h, int w, float x, float y) {
    x = x < 0 ? 0 : (x > w - 1.001 ? (float)(w - 1.001) : x);
    y = y < 0 ? 0 : (y > h - 1.001 ? (float)(h - 1.001) : y);
    int x0 = (int)x, y0 = (int)y, x1 = x0 + 1, y1 = y0 + 1;
    float dx0 = x - x0, dy0 = y - y0, dx1 = 1 - dx0, dy1 = 1 - dy0;
    return image[y0 * w + x0] * dx1 * dy1 + image[y0 * w + x1] * dx0 * dy1 + image[y1 * w + x0] * dx1 * dy0 +
           image[y1 * w + x1] * dx0 * dy0;
}

static PyObject *py_nms(PyObject *self, PyObject *args) {
    PyObject *edges_obj, *orient_obj, *out_obj;
    int h, w, radius, border;
    double multiplier;
    if (!PyArg_ParseTuple(args, "OOOiiiid", &edges_obj, &orient_obj, &out_obj, &h, &w, &radius, &border,
                          &multiplier)) {
        return NULL;
    }
    Buffer edges_buf = {.held = 0}, orient_buf = {.held = 0}, out_buf = {.held = 0};
    PyObject *result = NULL;
    if (image_pair(edges_obj, out_obj, h, w, &edges_buf, &out_buf, "nms") < 0 ||
        get_buffer(orient_obj, &orient_buf, 'f', 4, 0, "orientation") < 0) {
        goto done;
    }
    if (item_count(&orient_buf) != (Py_ssize_t)h * w) {
        PyErr_SetString(PyExc_ValueError, "nms: the orientation must hold height x width items");
        goto done;
    }
    const float *edges = edges_buf.view.buf, *orient = orient_buf.view.buf;
    float *out = out_buf.view.buf;
    float m = (float)multiplier;
    Py_BEGIN_ALLOW_THREADS
    for (int y = 0; y < h; y++) {
        for (int x = 0; x < w; x++) {
            Py_ssize_t i = (Py_ssize_t)y * w + x;
            float e = out[i] = edges[i];
            if (!e) {
                continue;
            }
            e *= m;
            float cos_o = cosf(orient[i]), sin_o = sinf(orient[i]);
            for (int d = -radius; d <= radius; d++) {
                if (d && e < interp(edges, h, w, x + d * cos_o, y + d * sin_o)) {
                    out[i] = 0;
                    break;
                }
            }
        }
    }
    int s = border;
    s = s > w / 2 ? w / 2 : s;
    s = s > h / 2 ? h / 2 : s;
    for (int x = 0; x < s; x++) {
        for (int y = 0; y < h; y++) {
            out[(Py_ssize_t)y * w + x] *= x / (float)s;
            out[(Py_ssize_t)y * w + (w - 1 - x)] *= x / (float)s;
        }
    }
    for (int x = 0; x < w; x++) {
        for (int y = 0; y < s; y++) {
            out[(Py_ssize_t)y * w + x] *= y / (float)s;
            out[(Py_ssize_t)(h - 1 - y) * w + x] *= y / (float)s;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    release(&edges_buf);
    release(&orient_buf);
    release(&out_buf);
    return result;
}

/* ------------------------------------------------------------------------------------------------ */
/* Thinning                                                                                         */

/* Deletion tables of the two sub-iterations (Lam, Lee and Suen 1992, as bwmorph 'thin'), indexed by the
 * neighbourhood code: bit i is neighbour x_{i+1}, x1 = east, then counter-clockwise. */
static unsigned char thin_table[2][256];

static void build_thin_tables(void) {
    for (int code = 0; code < 256; code++) {
        int x[9];
        for (int i = 0; i < 8; i++) {
            x[i] = (code >> i) & 1;
        }
        x[8] = x[0];
        int crossings = 0, n1 = 0, n2 = 0;
        for (int k = 0; k < 4; k++) {
            crossings += !x[2 * k] && (x[2 * k + 1] || x[2 * k + 2]);
            n1 += x[2 * k] || x[2 * k + 1];
            n2 += x[2 * k + 1] || x[2 * k + 2];
        }
        int low = n1 < n2 ? n1 : n2;
        int candidate = crossings == 1 && low >= 2 && low <= 3;
        thin_table[0][code] = candidate && !((x[1] || x[2] || !x[7]) && x[0]);
        thin_table[1][code] = candidate && !((x[5] || x[6] || !x[3]) && x[4]);
    }
}

/* Work space of the thinning of one pixel set: per sub-iteration, the pixels to judge (each once). */
typedef struct {
    unsigned char *image;   /* padded foreground */
    unsigned char *queued;  /* padded, bit t set while the pixel waits in pending[t] */
    int64_t *pending[2], *marked;
    int64_t neighbours[8];  /* padded-index offsets of x1..x8 */
} Thinner;

/* Thin the foreground `list` (padded flat indices, all set in `image`); returns the survivor count, the
 * survivors left at the front of `list`. Each sub-iteration judges pixels on the image as it found them
 * and deletes the marked ones together, until nothing changes (bwmorph 'thin' with n = Inf). A pixel is
 * judged again by a sub-iteration only when a neighbour was deleted since that sub-iteration last judged
 * it: otherwise its verdict cannot have changed, so the result is that of judging every pixel every time. */
static Py_ssize_t thin_list(Thinner *t, int64_t *list, Py_ssize_t count) {
    Py_ssize_t waiting[2] = {count, count};
    for (int which = 0; which < 2; which++) {
        memcpy(t->pending[which], list, (size_t)count * sizeof(int64_t));
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        t->queued[list[i]] = 3;
    }
    while (waiting[0] || waiting[1]) {
        for (int which = 0; which < 2; which++) {
            const unsigned char *table = thin_table[which];
            int64_t *queue = t->pending[which];
            Py_ssize_t judged = waiting[which], marks = 0;
            waiting[which] = 0;
            for (Py_ssize_t i = 0; i < judged; i++) {
                int64_t p = queue[i];
                t->queued[p] &= (unsigned char)~(1u << which);
                if (!t->image[p]) {
                    continue;
                }
                int code = 0;
                for (int b = 0; b < 8; b++) {
                    code |= t->image[p + t->neighbours[b]] << b;
                }
                if (table[code]) {
                    t->marked[marks++] = p;
                }
            }
            for (Py_ssize_t j = 0; j < marks; j++) {
                t->image[t->marked[j]] = 0;
            }
            for (Py_ssize_t j = 0; j < marks; j++) {
                for (int b = 0; b < 8; b++) {
                    int64_t q = t->marked[j] + t->neighbours[b];
                    if (!t->image[q]) {
                        continue;
                    }
                    for (int other = 0; other < 2; other++) {
                        if (!(t->queued[q] & (1u << other))) {
                            t->queued[q] |= (unsigned char)(1u << other);
                            t->pending[other][waiting[other]++] = q;
                        }
                    }
                }
            }
        }
    }
    Py_ssize_t kept = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (t->image[list[i]]) {
            list[kept++] = list[i];
        }
    }
    return kept;
}

static PyObject *py_thin_levels(PyObject *self, PyObject *args) {
    PyObject *order_obj, *ends_obj;
    int h, w;
    if (!PyArg_ParseTuple(args, "OOii", &order_obj, &ends_obj, &h, &w)) {
        return NULL;
    }
    Buffer order_buf = {.held = 0}, ends_buf = {.held = 0};
    Thinner t = {NULL, NULL, {NULL, NULL}, NULL, {0}};
    int64_t *list = NULL, *pixels = NULL, *offsets_out = NULL;
    PyObject *result = NULL;
    if (get_buffer(order_obj, &order_buf, 'i', 8, 0, "order") < 0 ||
        get_buffer(ends_obj, &ends_buf, 'i', 8, 0, "ends") < 0) {
        goto done;
    }
    const int64_t *order = order_buf.view.buf, *ends = ends_buf.view.buf;
    Py_ssize_t n = item_count(&order_buf), levels = item_count(&ends_buf);
    if (h < 1 || w < 1) {
        PyErr_SetString(PyExc_ValueError, "thin_levels: empty image");
        goto done;
    }
    for (Py_ssize_t k = 0; k < levels; k++) {
        if (ends[k] < 0 || ends[k] > n) {
            PyErr_SetString(PyExc_ValueError, "thin_levels: ends must lie in [0, len(order)]");
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (order[i] < 0 || order[i] >= (int64_t)h * w) {
            PyErr_SetString(PyExc_ValueError, "thin_levels: pixel index outside the image");
            goto done;
        }
    }
    int64_t stride = w + 2;
    size_t padded = (size_t)(h + 2) * (size_t)stride;
    int64_t total = 0;
    for (Py_ssize_t k = 0; k < levels; k++) {
        total += ends[k];
    }
    t.image = calloc(padded, 1);
    t.queued = calloc(padded, 1);
    t.pending[0] = malloc((n + 1) * sizeof(int64_t));
    t.pending[1] = malloc((n + 1) * sizeof(int64_t));
    t.marked = malloc((n + 1) * sizeof(int64_t));
    list = malloc((n + 1) * sizeof(int64_t));
    pixels = malloc((total + 1) * sizeof(int64_t));
    offsets_out = malloc((levels + 1) * sizeof(int64_t));
    if (!t.image || !t.queued || !t.pending[0] || !t.pending[1] || !t.marked || !list || !pixels || !offsets_out) {
        PyErr_NoMemory();
        goto done;
    }
    const int64_t neighbours[8] = {1, -stride + 1, -stride, -stride - 1, -1, stride - 1, stride, stride + 1};
    memcpy(t.neighbours, neighbours, sizeof(neighbours));
    int64_t written = 0;
    offsets_out[0] = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < levels; k++) {
        Py_ssize_t count = 0;
        for (int64_t i = 0; i < ends[k]; i++) {
            int64_t p = (order[i] / w + 1) * stride + order[i] % w + 1;
            if (!t.image[p]) {
                t.image[p] = 1;
                list[count++] = p;
            }
        }
        count = thin_list(&t, list, count);
        for (Py_ssize_t i = 0; i < count; i++) {
            t.image[list[i]] = 0;
            pixels[written + i] = (list[i] / stride - 1) * w + list[i] % stride - 1;
        }
        written += count;
        offsets_out[k + 1] = written;
    }
    Py_END_ALLOW_THREADS
    PyObject *pixels_obj = int64_array(pixels, written);
    PyObject *offsets_obj = pixels_obj ? int64_array(offsets_out, levels + 1) : NULL;
    if (pixels_obj && offsets_obj) {
        result = PyTuple_Pack(2, pixels_obj, offsets_obj);
    }
    Py_XDECREF(pixels_obj);
    Py_XDECREF(offsets_obj);
done:
    release(&order_buf);
    release(&ends_buf);
    free(t.image);
    free(t.queued);
    free(t.pending[0]);
    free(t.pending[1]);
    free(t.marked);
    free(list);
    free(pixels);
    free(offsets_out);
    return result;
}

/* ------------------------------------------------------------------------------------------------ */
/* Incremental maximum bipartite matching                                                          */

/* Left vertices: predicted pixels (the union over all sets); right vertices: ground-truth pixels; an edge
 * joins pixels at most `radius` apart. One matching is carried from set to set (thresholds from the highest
 * down) and made maximum again for each set. Right vertices that a failed search reached are "dead": no
 * alternating path from them leads to a free right vertex, so later searches skip them. Invariant between
 * searches: every alternating path from an already searched free left vertex stays among dead right
 * vertices (all matched, and closed under right -> mate -> neighbours). Going from one set to the next:
 *  - the pixels that leave are switched off; a freed mate that was not dead is reachable from no free
 *    left vertex (its closed dead set does not contain it), so the invariant survives; if a freed mate was
 *    dead, every dead mark is cleared and every free left vertex of the new set is searched again;
 *  - the pixels that join are searched (breadth-first, so augmenting paths are shortest).
 * At the end of each set no free left vertex has an augmenting path: the matching is maximum (Berge). The
 * argument in full is in densemtl/metrics/boundary_match.py. */
#define DEAD (-1)

/* A right vertex: its mate (-1 when free) and its mark: DEAD, or the stamp of the last search that reached
 * it (kept side by side: a search reads both). */
typedef struct {
    int32_t mate, mark;
} Right;

typedef struct {
    const int64_t *left_ptr;
    const int32_t *left_adj;
    int32_t *mate_left;
    Right *right;
    unsigned char *active;
    int32_t stamp;
    int64_t size;
    /* search space: a queue of left vertices, the left vertex each right vertex was reached from, the right
     * vertices reached */
    int32_t *queue, *parent, *visited;
} Matching;

/* Breadth-first search for a shortest augmenting path from the free left vertex `start`; flips it when
 * found. On failure every right vertex it reached becomes dead. */
static int augment(Matching *g, int32_t start) {
    int32_t stamp = ++g->stamp, *queue = g->queue, *parent = g->parent;
    Py_ssize_t head = 0, tail = 0, visited = 0;
    queue[tail++] = start;
    while (head < tail) {
        int32_t left = queue[head++];
        for (int64_t e = g->left_ptr[left]; e < g->left_ptr[left + 1]; e++) {
            int32_t right = g->left_adj[e];
            Right *state = g->right + right;
            if (state->mate < 0) { /* free: flip the path back to `start` */
                for (;;) {
                    int32_t before = g->mate_left[left];
                    g->mate_left[left] = right;
                    g->right[right].mate = left;
                    if (left == start) {
                        return 1;
                    }
                    right = before;
                    left = parent[before];
                }
            }
            if (state->mark == DEAD || state->mark == stamp) {
                continue;
            }
            state->mark = stamp;
            parent[right] = left;
            g->visited[visited++] = right;
            queue[tail++] = state->mate;
        }
    }
    for (Py_ssize_t i = 0; i < visited; i++) {
        g->right[g->visited[i]].mark = DEAD;
    }
    return 0;
}

static PyObject *py_match_levels(PyObject *self, PyObject *args) {
    PyObject *pixels_obj, *offsets_obj, *gt_obj;
    int h, w;
    double radius;
    if (!PyArg_ParseTuple(args, "OOOiid", &pixels_obj, &offsets_obj, &gt_obj, &h, &w, &radius)) {
        return NULL;
    }
    Buffer pixels_buf = {.held = 0}, offsets_buf = {.held = 0}, gt_buf = {.held = 0};
    PyObject *result = NULL;
    int32_t *union_id = NULL, *left_of = NULL, *left_adj = NULL, *right_of = NULL, *work = NULL;
    int64_t *left_ptr = NULL, *next = NULL, *sizes = NULL, *disk = NULL, *run_end = NULL;
    unsigned char *flags = NULL;
    Right *rights = NULL;
    if (get_buffer(pixels_obj, &pixels_buf, 'i', 8, 0, "pixels") < 0 ||
        get_buffer(offsets_obj, &offsets_buf, 'i', 8, 0, "offsets") < 0 ||
        get_buffer(gt_obj, &gt_buf, 'i', 8, 0, "gt") < 0) {
        goto done;
    }
    const int64_t *pixels = pixels_buf.view.buf, *level_ptr = offsets_buf.view.buf, *gt = gt_buf.view.buf;
    Py_ssize_t num_pixels = item_count(&pixels_buf), levels = item_count(&offsets_buf) - 1;
    Py_ssize_t num_gt = item_count(&gt_buf);
    int64_t area = (int64_t)h * w;
    if (levels < 0 || level_ptr[0] != 0 || level_ptr[levels] != num_pixels || !(radius >= 0) || radius > 1e4 ||
        h < 1 || w < 1 || area >= INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "match_levels: bad offsets, radius or image size");
        goto done;
    }
    for (Py_ssize_t k = 0; k < levels; k++) {
        if (level_ptr[k + 1] < level_ptr[k]) {
            PyErr_SetString(PyExc_ValueError, "match_levels: offsets must not decrease");
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < num_pixels; i++) {
        if (pixels[i] < 0 || pixels[i] >= area) {
            PyErr_SetString(PyExc_ValueError, "match_levels: pixel index outside the image");
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < num_gt; i++) {
        if (gt[i] < 0 || gt[i] >= area || (i && gt[i] <= gt[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "match_levels: gt must be increasing indices inside the image");
            goto done;
        }
    }
    sizes = calloc((size_t)levels + 1, sizeof(int64_t));
    if (!sizes) {
        PyErr_NoMemory();
        goto done;
    }
    if (num_gt == 0 || num_pixels == 0) {
        goto answer;
    }
    /* Ids of the union of the predicted sets in a map padded by the tolerance (a ground-truth pixel's disk is
     * then read without bounds checks), and the left id of every listed pixel. */
    int reach = (int)floor(radius);
    int64_t stride = w + 2 * (int64_t)reach, padded_area = (h + 2 * (int64_t)reach) * stride;
    Py_ssize_t num_offsets = 0;
    union_id = malloc((size_t)padded_area * sizeof(int32_t));
    left_of = malloc((size_t)num_pixels * sizeof(int32_t));
    disk = malloc((size_t)(2 * reach + 1) * (2 * reach + 1) * sizeof(int64_t));
    if (!union_id || !left_of || !disk) {
        PyErr_NoMemory();
        goto done;
    }
    for (int dy = -reach; dy <= reach; dy++) {
        for (int dx = -reach; dx <= reach; dx++) {
            if ((double)(dy * dy + dx * dx) <= radius * radius) {
                disk[num_offsets++] = dy * stride + dx;
            }
        }
    }
    int32_t num_union = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t p = 0; p < padded_area; p++) {
        union_id[p] = -1;
    }
    for (Py_ssize_t i = 0; i < num_pixels; i++) {
        int64_t p = (pixels[i] / w + reach) * stride + pixels[i] % w + reach;
        if (union_id[p] < 0) {
            union_id[p] = num_union++;
        }
        left_of[i] = union_id[p];
    }
    Py_END_ALLOW_THREADS
    /* Edges are enumerated from the ground-truth side (its pixels are few next to a cluttered prediction,
     * and a disk is read from a few nearby rows), then sorted by left vertex. */
    left_ptr = calloc((size_t)num_union + 1, sizeof(int64_t));
    run_end = malloc((size_t)num_gt * sizeof(int64_t)); /* where each ground-truth pixel's edges end */
    int64_t capacity = 16 * (int64_t)num_gt + 16, num_edges = 0;
    right_of = malloc((size_t)capacity * sizeof(int32_t)); /* per edge, in ground-truth order: its left vertex */
    if (!left_ptr || !run_end || !right_of) {
        PyErr_NoMemory();
        goto done;
    }
    int out_of_memory = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < num_gt; i++) {
        const int32_t *around = union_id + (gt[i] / w + reach) * stride + gt[i] % w + reach;
        if (num_edges + num_offsets > capacity) {
            capacity = 2 * capacity + num_offsets;
            int32_t *grown = realloc(right_of, (size_t)capacity * sizeof(int32_t));
            if (!grown) {
                out_of_memory = 1;
                break;
            }
            right_of = grown;
        }
        for (Py_ssize_t o = 0; o < num_offsets; o++) {
            int32_t left = around[disk[o]];
            if (left >= 0) {
                right_of[num_edges++] = left;
                left_ptr[left + 1]++;
            }
        }
        run_end[i] = num_edges;
    }
    Py_END_ALLOW_THREADS
    if (out_of_memory) {
        PyErr_NoMemory();
        goto done;
    }
    if (num_edges >= INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "match_levels: more than 2^31 pixel pairs within the tolerance");
        goto done;
    }
    left_adj = malloc((size_t)(num_edges + 1) * sizeof(int32_t));
    next = malloc(((size_t)num_union + 1) * sizeof(int64_t));
    if (!left_adj || !next) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (int32_t i = 0; i < num_union; i++) {
        left_ptr[i + 1] += left_ptr[i];
        next[i] = left_ptr[i];
    }
    for (Py_ssize_t i = 0, e = 0; i < num_gt; i++) {
        for (; e < run_end[i]; e++) {
            left_adj[next[right_of[e]]++] = (int32_t)i;
        }
    }
    Py_END_ALLOW_THREADS
    free(right_of);
    right_of = NULL;
    /* matching state */
    int32_t num_right = (int32_t)num_gt;
    Py_ssize_t vertices = (Py_ssize_t)num_union + num_right + 2;
    work = malloc(((size_t)num_union + (size_t)vertices * 3) * sizeof(int32_t));
    rights = malloc(((size_t)num_right + 1) * sizeof(Right));
    flags = calloc((size_t)num_union + 1, 1);
    if (!work || !rights || !flags) {
        PyErr_NoMemory();
        goto done;
    }
    Matching g;
    g.left_ptr = left_ptr;
    g.left_adj = left_adj;
    g.mate_left = work;
    g.queue = work + num_union;
    g.parent = g.queue + vertices;
    g.visited = g.parent + vertices;
    g.right = rights;
    g.active = flags;
    g.stamp = 0;
    g.size = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int32_t i = 0; i < num_union; i++) {
        g.mate_left[i] = -1;
    }
    for (int32_t i = 0; i < num_right; i++) {
        g.right[i].mate = -1;
        g.right[i].mark = 0;
    }
    for (Py_ssize_t k = levels - 1; k >= 0; k--) {
        /* active now marks the previous set; 2 = also in this one */
        for (int64_t i = level_ptr[k]; i < level_ptr[k + 1]; i++) {
            if (g.active[left_of[i]]) {
                g.active[left_of[i]] = 2;
            }
        }
        int reset = 0;
        if (k + 1 < levels) {
            for (int64_t i = level_ptr[k + 1]; i < level_ptr[k + 2]; i++) {
                int32_t left = left_of[i];
                if (g.active[left] == 1) { /* leaves */
                    g.active[left] = 0;
                    int32_t right = g.mate_left[left];
                    if (right >= 0) {
                        g.mate_left[left] = -1;
                        g.right[right].mate = -1;
                        g.size--;
                        reset |= g.right[right].mark == DEAD;
                    }
                }
            }
        }
        for (int32_t i = 0; reset && i < num_right; i++) {
            g.right[i].mark = g.right[i].mark == DEAD ? 0 : g.right[i].mark;
        }
        for (int64_t i = level_ptr[k]; i < level_ptr[k + 1]; i++) {
            int32_t left = left_of[i];
            int joins = !g.active[left];
            g.active[left] = 1;
            if ((joins || reset) && g.mate_left[left] < 0 && g.left_ptr[left + 1] > g.left_ptr[left] &&
                augment(&g, left)) {
                g.size++;
            }
        }
        sizes[k] = g.size;
    }
    Py_END_ALLOW_THREADS
answer:
    result = int64_array(sizes, levels);
done:
    release(&pixels_buf);
    release(&offsets_buf);
    release(&gt_buf);
    free(union_id);
    free(left_of);
    free(disk);
    free(left_ptr);
    free(next);
    free(left_adj);
    free(right_of);
    free(run_end);
    free(work);
    free(rights);
    free(flags);
    free(sizes);
    return result;
}

/* ------------------------------------------------------------------------------------------------ */

static PyMethodDef methods[] = {
    {"conv_tri", py_conv_tri, METH_VARARGS,
     "conv_tri(image, out, height, width, radius): triangle filter with symmetric padding into `out` (float32)."},
    {"orientation", py_orientation, METH_VARARGS,
     "orientation(edges, out, height, width, radius): orientation in [0, pi) of convTri(edges, radius) into `out`."},
    {"nms", py_nms, METH_VARARGS,
     "nms(edges, orientation, out, height, width, radius, border, multiplier): edge NMS into `out` (float32)."},
    {"thin_levels", py_thin_levels, METH_VARARGS,
     "thin_levels(order, ends, height, width) -> (pixels, offsets): bwmorph-thin each set order[:ends[k]]."},
    {"match_levels", py_match_levels, METH_VARARGS,
     "match_levels(pixels, offsets, gt, height, width, radius) -> sizes: maximum matching size per set."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_boundary_core", "Compiled kernels of densemtl's boundary evaluation.", -1, methods,
};

PyMODINIT_FUNC PyInit__boundary_core(void) {
    build_thin_tables();
    return PyModule_Create(&module);
}
