//! The C ABI over the Rust API (crate::api): opaque model handles, a plain request struct,
//! caller-provided pixel buffers, status codes and a thread-local last-error string. No
//! panic crosses the boundary: every entry point runs under `catch_unwind`.
//! include/checkergen.h is generated from this file by cbindgen (cbindgen.toml; CI checks
//! that the committed header is current). examples/c/sample.c (sampling, precision,
//! timings) and examples/c/score.c (scoring real images) show the use.

use crate::api::{Device, Error, Model, Policy, Precision, Request};
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What a call returned. `CG_STATUS_OK` is 0; on any other value `cg_last_error()` says
/// why, on the calling thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgStatus {
    /// Success.
    Ok = 0,
    /// A bad argument: a null pointer, a class id out of range, zero steps, a buffer too
    /// small, an absurd value. Nothing was done.
    InvalidArgument = 1,
    /// The model file could not be read or is not a model.
    LoadFailed = 2,
    /// The device asked for is not available.
    DeviceUnavailable = 3,
    /// Sampling failed on the device.
    SamplingFailed = 4,
    /// The progress callback asked to stop.
    Cancelled = 5,
    /// A bug inside the library (a caught panic); the message says where.
    Internal = 6,
}

/// Where `cg_model_load` puts the model.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgDevice {
    /// The first CUDA GPU when one is usable, else the CPU.
    Auto = 0,
    /// The f32 CPU reference backend.
    Cpu = 1,
    /// CUDA device `ordinal`.
    Cuda = 2,
    /// The host-emulated CUDA device (development and testing only; slow).
    Emulated = 3,
}

/// How the CPU path stores the transformer's large linears (`cg_model_set_precision`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgPrecision {
    /// f32 weights and arithmetic: the reference (the CPU's default).
    F32 = 0,
    /// bf16 weights, f32 accumulation (about half the bytes per step); the GPU path always
    /// stores these weights in bf16.
    Bf16 = 1,
}

/// Capacity of the per-scale arrays of a `CgScore` (the most scales a model may have).
pub const CG_MAX_SCALES: usize = 64;
const _: () = assert!(CG_MAX_SCALES == crate::limits::MAX_SCALES);

/// The teacher-forced likelihood of real images at one number of steps per scale, as one
/// line of `checkergen score --json` (`cg_score` fills one per value asked for).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CgScore {
    /// Steps per scale of this result.
    pub steps_per_scale: u32,
    /// Serial steps of that schedule (the 1x1 scale is one).
    pub serial_steps: u32,
    /// Images scored.
    pub images: usize,
    /// Mean cross-entropy over every code of every scale, nats per token.
    pub loss_total: f64,
    /// `loss_total` in bits (/ ln 2).
    pub bits_per_token: f64,
    /// Number of scales: the entries of the arrays below that are set.
    pub num_scales: usize,
    /// Side of each scale's code grid, ascending.
    pub scale_sizes: [u32; CG_MAX_SCALES],
    /// Mean cross-entropy of each scale's codes, nats per token.
    pub loss_by_scale: [f64; CG_MAX_SCALES],
    /// Fraction of each scale's true codes that were the model's argmax.
    pub top1_by_scale: [f64; CG_MAX_SCALES],
}

/// Where a `cg_sample_timed` call spent its time, in milliseconds summed over its batches:
/// on a GPU device time between stream timestamps, on the CPU wall time; on the emulated
/// device they mean nothing. Per-step figures go to a buffer the caller provides.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CgTimings {
    /// In: a buffer for the per-serial-step times (`step_ms_capacity` values), or null.
    pub step_ms: *mut f64,
    /// In: the values `step_ms` holds.
    pub step_ms_capacity: usize,
    /// Out: the per-step entries there are (the schedule's serial steps; 0 when a batch ran
    /// as a CUDA graph without step timestamps). The first min(num_steps,
    /// step_ms_capacity) are written to `step_ms`.
    pub num_steps: usize,
    /// Out: the sum of all per-step times.
    pub steps_total_ms: f64,
    /// Out: the class-token prefill.
    pub prefill_ms: f64,
    /// Out: the VQ decode into pixels.
    pub decode_ms: f64,
    /// Out: batches the request ran in.
    pub batches: u32,
    /// Out: of those, batches whose token loop ran as a replayed CUDA graph.
    pub replayed_batches: u32,
}

/// A loaded model (opaque). Free it with `cg_model_free`. One model may be used by several
/// threads at once.
pub struct CgModel(Model);

/// Called after every serial step of every batch: `batch` of `batches` (0-based), `step` of
/// `steps` done in it. Return 0 to go on, anything else to cancel (`cg_sample` then returns
/// `CG_STATUS_CANCELLED`).
pub type CgProgressFn = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        batch: u32,
        batches: u32,
        step: u32,
        steps: u32,
    ) -> i32,
>;

/// A sampling request. Fill the defaults with `cg_request_init`, then set `labels`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CgRequest {
    /// `num_labels` class ids, one image each.
    pub labels: *const u32,
    /// Number of images.
    pub num_labels: usize,
    /// Guidance strength (0 = off). Default 1.5.
    pub cfg: f32,
    /// First serial step with guidance. Default 5.
    pub cfg_start_step: u32,
    /// Steps on every scale, used when `steps` is null. Default 4.
    pub steps_per_scale: u32,
    /// Explicit steps per scale (`num_steps` values, one per scale), or null.
    pub steps: *const u32,
    /// Number of values at `steps`.
    pub num_steps: usize,
    /// 0 = greedy (argmax), > 0 = sampling temperature. Default 1.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off. Default 0.
    pub top_k: u32,
    /// Keep the most likely tokens up to probability p in (0, 1]; 0 = off. Default 0.
    pub top_p: f32,
    /// Random seed. Default 0.
    pub seed: u64,
    /// Images per batch; 0 = the device's default. Default 0.
    pub batch_size: u32,
    /// Optional progress callback (null = none).
    pub progress: CgProgressFn,
    /// Passed to `progress` unchanged.
    pub user_data: *mut c_void,
    /// First serial step without guidance (guidance on for cfg_start_step <= t <
    /// cfg_end_step; from it on the unconditional rows leave the batch, so the remaining
    /// steps cost half); 0 = to the end, the authors' behaviour. Default 0.
    pub cfg_end_step: u32,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn status_of(e: &Error) -> CgStatus {
    match e {
        Error::InvalidRequest(_) => CgStatus::InvalidArgument,
        Error::Load { .. } => CgStatus::LoadFailed,
        Error::Device { .. } => CgStatus::DeviceUnavailable,
        Error::Sampling(_) | Error::Scoring(_) => CgStatus::SamplingFailed,
        Error::Cancelled => CgStatus::Cancelled,
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidRequest(msg.into())
}

/// Run `f`, turning its error or panic into a status and the thread's last error.
fn guard(f: impl FnOnce() -> Result<(), Error>) -> CgStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_error("");
            CgStatus::Ok
        }
        Ok(Err(e)) => {
            set_error(&e.chain_message());
            status_of(&e)
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(&format!("internal error (a bug in checkergen): {what}"));
            CgStatus::Internal
        }
    }
}

/// The message of the last failed call on this thread ("" after a successful call). The
/// string stays valid until the next checkergen call on this thread; never free it.
#[unsafe(no_mangle)]
pub extern "C" fn cg_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The library version, e.g. "0.1.0" (static; never free it).
#[unsafe(no_mangle)]
pub extern "C" fn cg_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Load a model onto a device into `*out`. `path` is a model file (from `checkergen convert`
/// or `checkergen init`), or null for the `tiny` preset with random weights (seed 0).
/// `ordinal` is the CUDA device with `CG_DEVICE_CUDA`, ignored otherwise.
///
/// # Safety
/// `path` is null or a NUL-terminated string; `out` points to writable memory for a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cg_model_load(
    path: *const c_char,
    device: CgDevice,
    ordinal: u32,
    out: *mut *mut CgModel,
) -> CgStatus {
    guard(|| {
        if out.is_null() {
            return Err(invalid("cg_model_load: `out` is null"));
        }
        // SAFETY: `out` is non-null and writable (the caller's contract).
        unsafe { *out = std::ptr::null_mut() };
        let device = match device {
            CgDevice::Auto => Device::Auto,
            CgDevice::Cpu => Device::Cpu,
            CgDevice::Cuda => Device::Cuda(ordinal as usize),
            CgDevice::Emulated => Device::Emulated,
        };
        let model = if path.is_null() {
            Model::tiny(device)?
        } else {
            // SAFETY: a NUL-terminated string (the caller's contract).
            let p = unsafe { CStr::from_ptr(path) };
            let p = p
                .to_str()
                .map_err(|_| invalid("cg_model_load: the path is not UTF-8"))?;
            Model::load(p, device)?
        };
        // SAFETY: as above.
        unsafe { *out = Box::into_raw(Box::new(CgModel(model))) };
        Ok(())
    })
}

/// Store the CPU path's large transformer linears in `precision` (as `checkergen sample
/// --precision`): `CG_PRECISION_BF16` halves their bytes (f32 accumulation; logits within
/// about 1e-2 relative of f32). On a GPU or the emulator weights are always bf16: bf16 changes
/// nothing there and f32 is `CG_STATUS_INVALID_ARGUMENT`; so is f32 after bf16 on the CPU
/// (load the model again). On failure the model is unchanged. No other call may be using
/// the model meanwhile.
///
/// # Safety
/// `model` is null (an invalid argument) or a live pointer from `cg_model_load`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cg_model_set_precision(
    model: *mut CgModel,
    precision: CgPrecision,
) -> CgStatus {
    guard(|| {
        // SAFETY: null or live and not in use elsewhere (the caller's contract).
        let Some(m) = (unsafe { model.as_mut() }) else {
            return Err(invalid("cg_model_set_precision: `model` is null"));
        };
        m.0.set_precision(match precision {
            CgPrecision::F32 => Precision::F32,
            CgPrecision::Bf16 => Precision::Bf16,
        })
    })
}

/// How the model stores the transformer's large linears: on the CPU as set by
/// `cg_model_set_precision` (default f32), on a GPU always bf16 (f32 for a null model).
///
/// # Safety
/// `model` is null or a live pointer from `cg_model_load`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cg_model_precision(model: *const CgModel) -> CgPrecision {
    // SAFETY: null or live (the caller's contract).
    match unsafe { model.as_ref() }.map(|m| m.0.precision()) {
        Some(Precision::Bf16) => CgPrecision::Bf16,
        _ => CgPrecision::F32,
    }
}

/// Free a model from `cg_model_load` (null is ignored). No call may be using it.
///
/// # Safety
/// `model` is null or a pointer from `cg_model_load` not yet freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cg_model_free(model: *mut CgModel) {
    if !model.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: from Box::into_raw in cg_model_load, freed once (the caller's contract).
            drop(unsafe { Box::from_raw(model) })
        }));
    }
}

/// Side of the model's images in pixels (0 for a null model).
///
/// # Safety
/// `model` is null or a live pointer from `cg_model_load`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cg_model_image_size(model: *const CgModel) -> usize {
    // SAFETY: null or live (the caller's contract).
    unsafe { model.as_ref() }.map_or(0, |m| m.0.image_size())
}

/// Number of classes of the model: labels are 0 .. n-1 (0 for a null model).
///
/// # Safety
/// `model` is null or a live pointer from `cg_model_load`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cg_model_num_classes(model: *const CgModel) -> usize {
    // SAFETY: null or live (the caller's contract).
    unsafe { model.as_ref() }.map_or(0, |m| m.0.num_classes())
}

/// Fill `*request` with the released defaults (guidance 1.5 from step 5, 4 steps per scale,
/// temperature 1, seed 0, default batch size) and no labels.
///
/// # Safety
/// `request` is null (ignored) or points to writable memory for a `CgRequest`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cg_request_init(request: *mut CgRequest) {
    if request.is_null() {
        return;
    }
    let r = CgRequest {
        labels: std::ptr::null(),
        num_labels: 0,
        cfg: crate::pipeline::DEFAULT_CFG,
        cfg_start_step: crate::pipeline::DEFAULT_CFG_START_STEP as u32,
        steps_per_scale: crate::pipeline::DEFAULT_STEPS_PER_SCALE as u32,
        steps: std::ptr::null(),
        num_steps: 0,
        temperature: crate::pipeline::DEFAULT_TEMPERATURE,
        top_k: 0,
        top_p: 0.0,
        seed: 0,
        batch_size: 0,
        progress: None,
        user_data: std::ptr::null_mut(),
        cfg_end_step: 0,
    };
    // SAFETY: non-null and writable (the caller's contract); `write` drops nothing.
    unsafe { request.write(r) };
}

/// Bytes `cg_sample` writes for `num_images` images: num_images * H * W * 3 (0 for a null
/// model or on overflow).
///
/// # Safety
/// `model` is null or a live pointer from `cg_model_load`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cg_image_bytes(model: *const CgModel, num_images: usize) -> usize {
    // SAFETY: null or live (the caller's contract).
    unsafe { model.as_ref() }
        .and_then(|m| {
            let s = m.0.image_size();
            num_images.checked_mul(s * s * 3)
        })
        .unwrap_or(0)
}

/// The API request a `CgRequest` describes.
///
/// # Safety
/// The request's pointers are null or valid for their counts.
unsafe fn to_request(r: &CgRequest) -> Result<Request, Error> {
    if r.num_labels == 0 {
        return Err(invalid("no labels: give at least one class id"));
    }
    if r.labels.is_null() {
        return Err(invalid("`labels` is null"));
    }
    let max = crate::limits::MAX_RUN_IMAGES;
    if r.num_labels > max {
        return Err(invalid(format!(
            "{} labels: at most {max} images per request",
            r.num_labels
        )));
    }
    // SAFETY: non-null and valid for num_labels values (the caller's contract).
    let labels = unsafe { std::slice::from_raw_parts(r.labels, r.num_labels) };
    let mut q = Request::new(labels.iter().map(|&l| l as usize).collect::<Vec<_>>())
        .guidance(r.cfg)
        .cfg_start_step(r.cfg_start_step as usize)
        .seed(r.seed);
    if r.cfg_end_step != 0 {
        q = q.cfg_end_step(r.cfg_end_step as usize);
    }
    q = if r.steps.is_null() {
        q.steps_per_scale(r.steps_per_scale as usize)
    } else {
        if r.num_steps > crate::limits::MAX_SCALES {
            return Err(invalid(format!("{} step counts given", r.num_steps)));
        }
        // SAFETY: non-null and valid for num_steps values (the caller's contract).
        let s = unsafe { std::slice::from_raw_parts(r.steps, r.num_steps) };
        q.steps(s.iter().map(|&k| k as usize).collect::<Vec<_>>())
    };
    let mut p = if r.temperature == 0.0 {
        Policy::greedy()
    } else {
        Policy::sample(r.temperature)?
    };
    if r.top_k != 0 {
        p = p.top_k(r.top_k as usize)?;
    }
    if r.top_p != 0.0 {
        p = p.top_p(r.top_p)?;
    }
    q = q.policy(p);
    if r.batch_size != 0 {
        q = q.batch_size(r.batch_size as usize);
    }
    Ok(q)
}

/// Sample `request` into `out`: `num_labels` images of H x W RGB bytes each, channels last
/// (N, H, W, 3); `out_len` must be at least `cg_image_bytes(model, num_labels)`. On failure
/// `out` holds nothing meaningful.
///
/// # Safety
/// `model` is a live pointer from `cg_model_load`, `request` points to a `CgRequest` whose
/// pointers are valid for their counts, `out` is valid for `out_len` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cg_sample(
    model: *const CgModel,
    request: *const CgRequest,
    out: *mut u8,
    out_len: usize,
) -> CgStatus {
    // SAFETY: the caller's contract, and no timings.
    unsafe { cg_sample_timed(model, request, out, out_len, std::ptr::null_mut()) }
}

/// `cg_sample`, also filling `*timings` (when not null) with where the call spent its time:
/// set `timings->step_ms` / `step_ms_capacity` to a buffer for the per-step figures (or
/// null / 0), the other fields are written on success.
///
/// # Safety
/// As `cg_sample`; `timings` is null or points to a `CgTimings` whose `step_ms` is null or
/// valid for `step_ms_capacity` values of writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cg_sample_timed(
    model: *const CgModel,
    request: *const CgRequest,
    out: *mut u8,
    out_len: usize,
    timings: *mut CgTimings,
) -> CgStatus {
    guard(|| {
        // SAFETY: null or live (the caller's contract).
        let (Some(m), Some(r)) = (unsafe { model.as_ref() }, unsafe { request.as_ref() }) else {
            return Err(invalid("cg_sample: `model` or `request` is null"));
        };
        // SAFETY: the request's pointers (the caller's contract).
        let req = unsafe { to_request(r) }?;
        let side = m.0.image_size();
        let need = r
            .num_labels
            .checked_mul(side * side * 3)
            .ok_or_else(|| invalid("too many images"))?;
        if out.is_null() || out_len < need {
            return Err(invalid(format!(
                "the output buffer holds {out_len} bytes; {} images need {need} \
                 (cg_image_bytes)",
                r.num_labels
            )));
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let req = req.cancel_flag(cancel.clone());
        let images = m.0.sample_with_progress(&req, |p| {
            if let (
                Some(f),
                crate::api::Progress::Step {
                    batch,
                    batches,
                    step,
                    steps,
                },
            ) = (r.progress, p)
            {
                // SAFETY: the caller's callback, with its own user data.
                let stop = unsafe {
                    f(
                        r.user_data,
                        batch as u32,
                        batches as u32,
                        step as u32,
                        steps as u32,
                    )
                };
                if stop != 0 {
                    cancel.store(true, Ordering::Relaxed);
                }
            }
        })?;
        // SAFETY: `out` is valid for out_len >= need bytes (checked above).
        let dst = unsafe { std::slice::from_raw_parts_mut(out, need) };
        dst.copy_from_slice(images.pixels());
        // SAFETY: null or a valid CgTimings (the caller's contract).
        if let Some(t) = unsafe { timings.as_mut() } {
            let src = images.timings();
            let n = src.step_ms.len();
            if !t.step_ms.is_null() {
                let k = n.min(t.step_ms_capacity);
                // SAFETY: valid for step_ms_capacity >= k values (the caller's contract).
                unsafe { std::slice::from_raw_parts_mut(t.step_ms, k) }
                    .copy_from_slice(&src.step_ms[..k]);
            }
            t.num_steps = n;
            t.steps_total_ms = src.step_ms.iter().sum();
            t.prefill_ms = src.prefill_ms;
            t.decode_ms = src.decode_ms;
            t.batches = src.batches as u32;
            t.replayed_batches = src.replayed_batches as u32;
        }
        Ok(())
    })
}

/// Score real images (as `checkergen score`): `images` holds `num_images` 8-bit RGB images
/// of `cg_model_image_size` squared, channels last (N, H, W, 3; `images_len` bytes, exactly
/// `cg_image_bytes(model, num_images)`), `labels` one class id each. Each image is encoded
/// by the model's VQ encoder and scored at every one of the `num_values` values of
/// `steps_per_scale`; `out` receives one `CgScore` per value, in order. Needs a model file
/// with the encoder (`checkergen convert` keeps it, `checkergen init` writes it). Failures
/// on the device are `CG_STATUS_SAMPLING_FAILED`.
///
/// # Safety
/// `model` is a live pointer from `cg_model_load`; `images`, `labels`, `steps_per_scale`
/// and `out` are valid for `images_len` bytes, `num_images`, `num_values` and `num_values`
/// values (`out` for writes).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cg_score(
    model: *const CgModel,
    images: *const u8,
    images_len: usize,
    labels: *const u32,
    num_images: usize,
    steps_per_scale: *const u32,
    num_values: usize,
    out: *mut CgScore,
) -> CgStatus {
    guard(|| {
        // SAFETY: null or live (the caller's contract).
        let Some(m) = (unsafe { model.as_ref() }) else {
            return Err(invalid("cg_score: `model` is null"));
        };
        if images.is_null() || labels.is_null() || steps_per_scale.is_null() || out.is_null() {
            return Err(invalid(
                "cg_score: `images`, `labels`, `steps_per_scale` or `out` is null",
            ));
        }
        if num_images == 0 || num_values == 0 {
            return Err(invalid(
                "cg_score: give at least one image and one steps-per-scale value",
            ));
        }
        let max = crate::limits::MAX_RUN_IMAGES;
        if num_images > max || num_values > CG_MAX_SCALES {
            return Err(invalid(format!(
                "cg_score: {num_images} images, {num_values} steps-per-scale values: at most \
                 {max} and {CG_MAX_SCALES}"
            )));
        }
        let side = m.0.image_size();
        let need = num_images
            .checked_mul(side * side * 3)
            .ok_or_else(|| invalid("cg_score: too many images"))?;
        if images_len != need {
            return Err(invalid(format!(
                "cg_score: {images_len} bytes of images; {num_images} images of {side} x \
                 {side} x 3 are {need} (cg_image_bytes)"
            )));
        }
        if m.0.scale_sizes().len() > CG_MAX_SCALES {
            return Err(invalid(format!(
                "cg_score: the model has {} scales, a CgScore holds {CG_MAX_SCALES}",
                m.0.scale_sizes().len()
            )));
        }
        // SAFETY: non-null and valid for their counts (the caller's contract).
        let (rgb, labels, values) = unsafe {
            (
                std::slice::from_raw_parts(images, need),
                std::slice::from_raw_parts(labels, num_images),
                std::slice::from_raw_parts(steps_per_scale, num_values),
            )
        };
        let labels: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
        let values: Vec<usize> = values.iter().map(|&k| k as usize).collect();
        let scores = m.0.score(rgb, &labels, &values)?;
        for (i, sc) in scores.iter().enumerate() {
            let mut c = CgScore {
                steps_per_scale: sc.steps_per_scale() as u32,
                serial_steps: sc.serial_steps() as u32,
                images: sc.images(),
                loss_total: sc.loss_total(),
                bits_per_token: sc.loss_total() / std::f64::consts::LN_2,
                num_scales: sc.scale_sizes().len(),
                scale_sizes: [0; CG_MAX_SCALES],
                loss_by_scale: [0.0; CG_MAX_SCALES],
                top1_by_scale: [0.0; CG_MAX_SCALES],
            };
            let n = c.num_scales;
            for (d, &s) in c.scale_sizes.iter_mut().zip(sc.scale_sizes()) {
                *d = s as u32;
            }
            c.loss_by_scale[..n].copy_from_slice(&sc.loss_by_scale());
            c.top1_by_scale[..n].copy_from_slice(&sc.top1_by_scale());
            // SAFETY: `out` is valid for num_values > i writes (the caller's contract; the
            // memory may be uninitialised: `write` reads and drops nothing).
            unsafe { out.add(i).write(c) };
        }
        Ok(())
    })
}
