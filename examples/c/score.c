/* Score real images through the checkergen C ABI (as `checkergen score`): the teacher-forced
 * likelihood of each image's VQ codes under the model, at several steps per scale.
 *
 *   cc examples/c/score.c -Iinclude -Ltarget/release -lcheckergen -o target/score-c
 *   LD_LIBRARY_PATH=target/release target/score-c MODEL.safetensors STEPS LABEL:IMAGE.ppm...
 *
 * MODEL is a model file with the VQ encoder (`checkergen init` or `checkergen convert`),
 * STEPS a comma-separated list of steps per scale (e.g. 2,4,8), each image a binary PPM (P6,
 * 8 bits) of the model's image size with its class id. Runs on the CPU; prints one line per
 * steps value: key=value pairs (the fields of `checkergen score --json`, losses in nats per
 * token, %.17g so that they read back exactly). Exit status 0 on success, 1 with the
 * library's message on failure, 2 for bad arguments. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checkergen.h"

/* Read a binary PPM of side x side pixels into dst (side * side * 3 bytes); 0 on success. */
static int read_ppm(const char *name, size_t side, uint8_t *dst) {
    FILE *f = fopen(name, "rb");
    if (f == NULL) {
        perror(name);
        return 1;
    }
    unsigned w = 0, h = 0, maxval = 0;
    int ok = fscanf(f, "P6 %u %u %u", &w, &h, &maxval) == 3 && fgetc(f) != EOF;
    if (!ok || w != side || h != side || maxval != 255) {
        fprintf(stderr, "%s: not a %zux%zu 8-bit binary PPM (P6)\n", name, side, side);
        fclose(f);
        return 1;
    }
    size_t n = side * side * 3;
    size_t got = fread(dst, 1, n, f);
    fclose(f);
    if (got != n) {
        fprintf(stderr, "%s: %zu of %zu pixel bytes\n", name, got, n);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL STEPS LABEL:IMAGE.ppm...\n", argv[0]);
        return 2;
    }
    uint32_t steps[CG_MAX_SCALES];
    size_t num_steps = 0;
    for (char *p = argv[2]; *p != '\0';) {
        char *end;
        unsigned long k = strtoul(p, &end, 10);
        if (end == p || (*end != ',' && *end != '\0') || num_steps == CG_MAX_SCALES) {
            fprintf(stderr, "STEPS must be at most %d comma-separated numbers, got %s\n",
                    CG_MAX_SCALES, argv[2]);
            return 2;
        }
        steps[num_steps++] = (uint32_t)k;
        p = *end == ',' ? end + 1 : end;
    }

    CgModel *model = NULL;
    CgStatus st = cg_model_load(argv[1], CG_DEVICE_CPU, 0, &model);
    if (st != CG_STATUS_OK) {
        fprintf(stderr, "cg_model_load failed (status %d): %s\n", (int)st, cg_last_error());
        return 1;
    }
    size_t n = (size_t)(argc - 3);
    size_t side = cg_model_image_size(model);
    size_t bytes = cg_image_bytes(model, n);
    uint8_t *pixels = malloc(bytes);
    uint32_t *labels = malloc(n * sizeof *labels);
    CgScore *scores = malloc(num_steps * sizeof *scores);
    int rc = 0;
    if (pixels == NULL || labels == NULL || scores == NULL) {
        fprintf(stderr, "out of memory\n");
        rc = 1;
        goto done;
    }
    for (size_t i = 0; i < n; ++i) {
        char *arg = argv[3 + i];
        char *colon = strchr(arg, ':');
        if (colon == NULL) {
            fprintf(stderr, "images are LABEL:FILE.ppm, got %s\n", arg);
            rc = 2;
            goto done;
        }
        labels[i] = (uint32_t)strtoul(arg, NULL, 10);
        if (read_ppm(colon + 1, side, pixels + i * side * side * 3) != 0) {
            rc = 1;
            goto done;
        }
    }

    st = cg_score(model, pixels, bytes, labels, n, steps, num_steps, scores);
    if (st != CG_STATUS_OK) {
        fprintf(stderr, "cg_score failed (status %d): %s\n", (int)st, cg_last_error());
        rc = 1;
        goto done;
    }
    for (size_t j = 0; j < num_steps; ++j) {
        const CgScore *s = &scores[j];
        printf("steps_per_scale=%u serial_steps=%u images=%zu loss_total=%.17g "
               "bits_per_token=%.17g",
               s->steps_per_scale, s->serial_steps, s->images, s->loss_total,
               s->bits_per_token);
        for (size_t k = 0; k < s->num_scales; ++k)
            printf(" loss_%u=%.17g top1_%u=%.17g", s->scale_sizes[k], s->loss_by_scale[k],
                   s->scale_sizes[k], s->top1_by_scale[k]);
        printf("\n");
    }

    /* A buffer of the wrong size is a status and a message, never a crash. */
    st = cg_score(model, pixels, bytes - 1, labels, n, steps, num_steps, scores);
    if (st != CG_STATUS_INVALID_ARGUMENT) {
        fprintf(stderr, "expected CG_STATUS_INVALID_ARGUMENT, got %d\n", (int)st);
        rc = 1;
        goto done;
    }
    printf("short buffer refused: %s\n", cg_last_error());

done:
    free(scores);
    free(labels);
    free(pixels);
    cg_model_free(model);
    return rc;
}
