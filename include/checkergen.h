/* checkergen C ABI: generated from src/capi.rs by cbindgen (cbindgen.toml); do not edit.
 * Every function returns a CgStatus (0 = CG_STATUS_OK) or a plain value; after a failure
 * cg_last_error() gives the message on the calling thread. Images are (N, H, W, 3) RGB bytes
 * in caller-provided buffers of cg_image_bytes(model, N) bytes (sampled into, or scored). */

#ifndef CHECKERGEN_H
#define CHECKERGEN_H

#include <stddef.h>
#include <stdint.h>
// Capacity of the per-scale arrays of a CgScore (the most scales a model may have).
#define CG_MAX_SCALES 64

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

// How the CPU path stores the transformer's large linears (`cg_model_set_precision`).
typedef enum CgPrecision {
  // f32 weights and arithmetic: the reference (the CPU's default).
  CG_PRECISION_F32 = 0,
  // bf16 weights, f32 accumulation (about half the bytes per step); the GPU path always
  // stores these weights in bf16.
  CG_PRECISION_BF16 = 1,
} CgPrecision;

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
  // First serial step without guidance (guidance on for cfg_start_step <= t <
  // cfg_end_step; from it on the unconditional rows leave the batch, so the remaining
  // steps cost half); 0 = to the end, the authors' behaviour. Default 0.
  uint32_t cfg_end_step;
} CgRequest;

// Where a `cg_sample_timed` call spent its time, in milliseconds summed over its batches:
// on a GPU device time between stream timestamps, on the CPU wall time; on the emulated
// device they mean nothing. Per-step figures go to a buffer the caller provides.
typedef struct CgTimings {
  // In: a buffer for the per-serial-step times (`step_ms_capacity` values), or null.
  double *step_ms;
  // In: the values `step_ms` holds.
  size_t step_ms_capacity;
  // Out: the per-step entries there are (the schedule's serial steps; 0 when a batch ran
  // as a CUDA graph without step timestamps). The first min(num_steps,
  // step_ms_capacity) are written to `step_ms`.
  size_t num_steps;
  // Out: the sum of all per-step times.
  double steps_total_ms;
  // Out: the class-token prefill.
  double prefill_ms;
  // Out: the VQ decode into pixels.
  double decode_ms;
  // Out: batches the request ran in.
  uint32_t batches;
  // Out: of those, batches whose token loop ran as a replayed CUDA graph.
  uint32_t replayed_batches;
} CgTimings;

// The teacher-forced likelihood of real images at one number of steps per scale, as one
// line of `checkergen score --json` (`cg_score` fills one per value asked for).
typedef struct CgScore {
  // Steps per scale of this result.
  uint32_t steps_per_scale;
  // Serial steps of that schedule (the 1x1 scale is one).
  uint32_t serial_steps;
  // Images scored.
  size_t images;
  // Mean cross-entropy over every code of every scale, nats per token.
  double loss_total;
  // `loss_total` in bits (/ ln 2).
  double bits_per_token;
  // Number of scales: the entries of the arrays below that are set.
  size_t num_scales;
  // Side of each scale's code grid, ascending.
  uint32_t scale_sizes[CG_MAX_SCALES];
  // Mean cross-entropy of each scale's codes, nats per token.
  double loss_by_scale[CG_MAX_SCALES];
  // Fraction of each scale's true codes that were the model's argmax.
  double top1_by_scale[CG_MAX_SCALES];
} CgScore;

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

// Store the CPU path's large transformer linears in `precision` (as `checkergen sample
// --precision`): `CG_PRECISION_BF16` halves their bytes (f32 accumulation; logits within
// about 1e-2 relative of f32). On a GPU or the emulator weights are always bf16: bf16 changes
// nothing there and f32 is `CG_STATUS_INVALID_ARGUMENT`; so is f32 after bf16 on the CPU
// (load the model again). On failure the model is unchanged. No other call may be using
// the model meanwhile.
//
// # Safety
// `model` is null (an invalid argument) or a live pointer from `cg_model_load`.
enum CgStatus cg_model_set_precision(struct CgModel *model, enum CgPrecision precision);

// How the model stores the transformer's large linears: on the CPU as set by
// `cg_model_set_precision` (default f32), on a GPU always bf16 (f32 for a null model).
//
// # Safety
// `model` is null or a live pointer from `cg_model_load`.
enum CgPrecision cg_model_precision(const struct CgModel *model);

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

// `cg_sample`, also filling `*timings` (when not null) with where the call spent its time:
// set `timings->step_ms` / `step_ms_capacity` to a buffer for the per-step figures (or
// null / 0), the other fields are written on success.
//
// # Safety
// As `cg_sample`; `timings` is null or points to a `CgTimings` whose `step_ms` is null or
// valid for `step_ms_capacity` values of writes.
enum CgStatus cg_sample_timed(const struct CgModel *model,
                              const struct CgRequest *request,
                              uint8_t *out,
                              size_t out_len,
                              struct CgTimings *timings);

// Score real images (as `checkergen score`): `images` holds `num_images` 8-bit RGB images
// of `cg_model_image_size` squared, channels last (N, H, W, 3; `images_len` bytes, exactly
// `cg_image_bytes(model, num_images)`), `labels` one class id each. Each image is encoded
// by the model's VQ encoder and scored at every one of the `num_values` values of
// `steps_per_scale`; `out` receives one `CgScore` per value, in order. Needs a model file
// with the encoder (`checkergen convert` keeps it, `checkergen init` writes it). Failures
// on the device are `CG_STATUS_SAMPLING_FAILED`.
//
// # Safety
// `model` is a live pointer from `cg_model_load`; `images`, `labels`, `steps_per_scale`
// and `out` are valid for `images_len` bytes, `num_images`, `num_values` and `num_values`
// values (`out` for writes).
enum CgStatus cg_score(const struct CgModel *model,
                       const uint8_t *images,
                       size_t images_len,
                       const uint32_t *labels,
                       size_t num_images,
                       const uint32_t *steps_per_scale,
                       size_t num_values,
                       struct CgScore *out);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* CHECKERGEN_H */
