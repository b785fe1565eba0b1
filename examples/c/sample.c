/* Sample images through the checkergen C ABI and write them as binary PPM files.
 *
 *   cc examples/c/sample.c -Iinclude -Ltarget/release -lcheckergen -o target/sample-c
 *   LD_LIBRARY_PATH=target/release target/sample-c MODEL.safetensors|- OUT_PREFIX [SEED [f32|bf16]]
 *
 * Without a model file ("-") it samples the tiny preset with random weights on the CPU:
 * labels 0, 1, 2, the released settings, seed SEED (default 0), the transformer's weights in
 * f32 (default) or bf16 (as `checkergen sample --precision bf16`). Each image goes to
 * OUT_PREFIX_NNNN.ppm; the call's timings (per serial step, prefill, decode) are printed.
 * Exit status 0 on success, 1 with the library's message on failure. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkergen.h"

static int32_t on_step(void *user_data, uint32_t batch, uint32_t batches, uint32_t step,
                       uint32_t steps) {
    unsigned *calls = (unsigned *)user_data;
    ++*calls;
    if (step == steps)
        fprintf(stderr, "batch %u/%u done (%u steps)\n", batch + 1, batches, steps);
    return 0; /* non-zero would cancel */
}

static int fail(const char *what, CgStatus st) {
    fprintf(stderr, "%s failed (status %d): %s\n", what, (int)st, cg_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL|- OUT_PREFIX [SEED [f32|bf16]]\n", argv[0]);
        return 2;
    }
    const char *path = strcmp(argv[1], "-") == 0 ? NULL : argv[1];
    uint64_t seed = argc > 3 ? strtoull(argv[3], NULL, 10) : 0;
    const char *prec = argc > 4 ? argv[4] : "f32";
    if (strcmp(prec, "f32") != 0 && strcmp(prec, "bf16") != 0) {
        fprintf(stderr, "precision must be f32 or bf16, got %s\n", prec);
        return 2;
    }

    CgModel *model = NULL;
    CgStatus st = cg_model_load(path, CG_DEVICE_CPU, 0, &model);
    if (st != CG_STATUS_OK)
        return fail("cg_model_load", st);
    if (strcmp(prec, "bf16") == 0) {
        st = cg_model_set_precision(model, CG_PRECISION_BF16);
        if (st != CG_STATUS_OK) {
            cg_model_free(model);
            return fail("cg_model_set_precision", st);
        }
    }

    uint32_t labels[] = {0, 1, 2};
    size_t n = sizeof labels / sizeof labels[0];
    unsigned calls = 0;
    CgRequest req;
    cg_request_init(&req);
    req.labels = labels;
    req.num_labels = n;
    req.seed = seed;
    req.batch_size = 2; /* two batches: the images do not depend on it */
    req.progress = on_step;
    req.user_data = &calls;

    size_t bytes = cg_image_bytes(model, n);
    uint8_t *pixels = malloc(bytes);
    if (pixels == NULL) {
        cg_model_free(model);
        return 1;
    }
    /* The per-step times go to a buffer of ours: one value per serial step. */
    double step_ms[512];
    CgTimings timings;
    memset(&timings, 0, sizeof timings);
    timings.step_ms = step_ms;
    timings.step_ms_capacity = sizeof step_ms / sizeof step_ms[0];
    st = cg_sample_timed(model, &req, pixels, bytes, &timings);
    if (st != CG_STATUS_OK) {
        free(pixels);
        cg_model_free(model);
        return fail("cg_sample_timed", st);
    }

    size_t side = cg_model_image_size(model);
    for (size_t i = 0; i < n; ++i) {
        char name[4096];
        snprintf(name, sizeof name, "%s_%04zu.ppm", argv[2], i);
        FILE *f = fopen(name, "wb");
        if (f == NULL) {
            perror(name);
            free(pixels);
            cg_model_free(model);
            return 1;
        }
        fprintf(f, "P6\n%zu %zu\n255\n", side, side);
        fwrite(pixels + i * side * side * 3, 1, side * side * 3, f);
        fclose(f);
    }
    printf("checkergen %s: %zu images of %zux%zu, %u progress calls, precision %s\n",
           cg_version(), n, side, side, calls,
           cg_model_precision(model) == CG_PRECISION_BF16 ? "bf16" : "f32");
    /* Wall times on the CPU (device times on a GPU), summed over the batches. */
    printf("timings: %zu serial steps, %u batches, steps %.1f ms (first %.2f ms), prefill "
           "%.2f ms, decode %.1f ms\n",
           timings.num_steps, timings.batches, timings.steps_total_ms,
           timings.num_steps > 0 ? step_ms[0] : 0.0, timings.prefill_ms, timings.decode_ms);

    /* A bad request is a status and a message, never a crash. */
    labels[0] = 1000000;
    st = cg_sample(model, &req, pixels, bytes);
    if (st != CG_STATUS_INVALID_ARGUMENT) {
        fprintf(stderr, "expected CG_STATUS_INVALID_ARGUMENT, got %d\n", (int)st);
        return 1;
    }
    printf("bad label refused: %s\n", cg_last_error());

    free(pixels);
    cg_model_free(model);
    return 0;
}
