/* checkergen C ABI: generated from src/capi.rs by cbindgen (cbindgen.toml); do not edit.
 * Every function returns a CgStatus (0 = CG_STATUS_OK) or a plain value; after a failure
 * cg_last_error() gives the message on the calling thread. Images are (N, H, W, 3) RGB bytes
 * written into a caller-provided buffer of cg_image_bytes(model, N) bytes. */

#ifndef CHECKERGEN_H
#define CHECKERGEN_H

#include <stddef.h>
#include <stdint.h>

// What a call returned. `CG_STATUS_OK` is 0; on any other value `cg_last_error()` says
// why, on the calling thread.
typedef enum CgStatus {
  // Success.
  CG_STATUS_OK = 0,
  // A bad argument: a null pointer, a class id out of range, zero steps, a buffer too
  // small, an absurd value. Nothing was done.
  CG_STATUS_INVALID_ARGUMENT = 1,
  // The model file could not be read or is not a model.
  CG_STATUS_LOAD_FAILED = 2,
  // The device asked for is not available.
  CG_STATUS_DEVICE_UNAVAILABLE = 3,
  // Sampling failed on the device.
  CG_STATUS_SAMPLING_FAILED = 4,
  // The progress callback asked to stop.
  CG_STATUS_CANCELLED = 5,
  // A bug inside the library (a caught panic); the message says where.
  CG_STATUS_INTERNAL = 6,
} CgStatus;

// Where `cg_model_load` puts the model.
typedef enum CgDevice {
  // The first CUDA GPU when one is usable, else the CPU.
  CG_DEVICE_AUTO = 0,
  // The f32 CPU reference backend.
  CG_DEVICE_CPU = 1,
  // CUDA device `ordinal`.
  CG_DEVICE_CUDA = 2,
  // The host-emulated CUDA device (development and testing only; slow).
  CG_DEVICE_EMULATED = 3,
} CgDevice;

// A loaded model (opaque). Free it with `cg_model_free`. One model may be used by several
// threads at once.
typedef struct CgModel CgModel;

// Called after every serial step of every batch: `batch` of `batches` (0-based), `step` of
// `steps` done in it. Return 0 to go on, anything else to cancel (`cg_sample` then returns
// `CG_STATUS_CANCELLED`).
typedef int32_t (*CgProgressFn)(void *user_data,
                                uint32_t batch,
                                uint32_t batches,
                                uint32_t step,
                                uint32_t steps);

// A sampling request. Fill the defaults with `cg_request_init`, then set `labels`.
typedef struct CgRequest {
  // `num_labels` class ids, one image each.
  const uint32_t *labels;
  // Number of images.
  size_t num_labels;
  // Guidance strength (0 = off). Default 1.5.
  float cfg;
  // First serial step with guidance. Default 5.
  uint32_t cfg_start_step;
  // Steps on every scale, used when `steps` is null. Default 4.
  uint32_t steps_per_scale;
  // Explicit steps per scale (`num_steps` values, one per scale), or null.
  const uint32_t *steps;
  // Number of values at `steps`.
  size_t num_steps;
  // 0 = greedy (argmax), > 0 = sampling temperature. Default 1.
  float temperature;
  // Keep the k most likely tokens; 0 = off. Default 0.
  uint32_t top_k;
  // Keep the most likely tokens up to probability p in (0, 1]; 0 = off. Default 0.
  float top_p;
  // Random seed. Default 0.
  uint64_t seed;
  // Images per batch; 0 = the device's default. Default 0.
  uint32_t batch_size;
  // Optional progress callback (null = none).
  CgProgressFn progress;
  // Passed to `progress` unchanged.
  void *user_data;
} CgRequest;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// The message of the last failed call on this thread ("" after a successful call). The
// string stays valid until the next checkergen call on this thread; never free it.
const char *cg_last_error(void);

// The library version, e.g. "0.1.0" (static; never free it).
const char *cg_version(void);

// Load a model onto a device into `*out`. `path` is a model file (from `checkergen convert`
// or `checkergen init`), or null for the `tiny` preset with random weights (seed 0).
// `ordinal` is the CUDA device with `CG_DEVICE_CUDA`, ignored otherwise.
//
// # Safety
// `path` is null or a NUL-terminated string; `out` points to writable memory for a pointer.
enum CgStatus cg_model_load(const char *path,
                            enum CgDevice device,
                            uint32_t ordinal,
                            struct CgModel **out);

// Free a model from `cg_model_load` (null is ignored). No call may be using it.
//
// # Safety
// `model` is null or a pointer from `cg_model_load` not yet freed.
void cg_model_free(struct CgModel *model);

// Side of the model's images in pixels (0 for a null model).
//
// # Safety
// `model` is null or a live pointer from `cg_model_load`.
size_t cg_model_image_size(const struct CgModel *model);

// Number of classes of the model: labels are 0 .. n-1 (0 for a null model).
//
// # Safety
// `model` is null or a live pointer from `cg_model_load`.
size_t cg_model_num_classes(const struct CgModel *model);

// Fill `*request` with the released defaults (guidance 1.5 from step 5, 4 steps per scale,
// temperature 1, seed 0, default batch size) and no labels.
//
// # Safety
// `request` is null (ignored) or points to writable memory for a `CgRequest`.
void cg_request_init(struct CgRequest *request);

// Bytes `cg_sample` writes for `num_images` images: num_images * H * W * 3 (0 for a null
// model or on overflow).
//
// # Safety
// `model` is null or a live pointer from `cg_model_load`.
size_t cg_image_bytes(const struct CgModel *model, size_t num_images);

// Sample `request` into `out`: `num_labels` images of H x W RGB bytes each, channels last
// (N, H, W, 3); `out_len` must be at least `cg_image_bytes(model, num_labels)`. On failure
// `out` holds nothing meaningful.
//
// # Safety
// `model` is a live pointer from `cg_model_load`, `request` points to a `CgRequest` whose
// pointers are valid for their counts, `out` is valid for `out_len` bytes of writes.
enum CgStatus cg_sample(const struct CgModel *model,
                        const struct CgRequest *request,
                        uint8_t *out,
                        size_t out_len);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* CHECKERGEN_H */
