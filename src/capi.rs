//! The C ABI over the Rust API (crate::api): opaque model handles, a plain request struct,
//! caller-provided pixel buffers, status codes and a thread-local last-error string. No
//! panic crosses the boundary: every entry point runs under `catch_unwind`.
//! include/checkergen.h is generated from this file by cbindgen (cbindgen.toml; CI checks
//! that the committed header is current). examples/c/sample.c shows the use.

use crate::api::{Device, Error, Model, Policy, Request};
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
        Ok(())
    })
}
