//! `checkergen._checkergen`: the Python face of the Rust API (`checkergen::Model`). The
//! package `checkergen` (python/checkergen/__init__.py) re-exports it; the type stubs are
//! python/checkergen/__init__.pyi.

use checkergen::{Device, Error, Policy, Precision, Request};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyKeyboardInterrupt, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pyo3::create_exception!(
    _checkergen,
    CheckergenError,
    pyo3::exceptions::PyRuntimeError,
    "A model could not be loaded, a device is unavailable, or sampling failed."
);

/// An API error as a Python exception: bad requests are `ValueError`, the rest
/// `CheckergenError`; the message is the whole context chain.
fn to_py(e: Error) -> PyErr {
    match e {
        Error::InvalidRequest(_) => PyValueError::new_err(e.chain_message()),
        Error::Cancelled => PyKeyboardInterrupt::new_err("sampling cancelled"),
        e => CheckergenError::new_err(e.chain_message()),
    }
}

fn parse_device(s: &str) -> PyResult<Device> {
    s.parse().map_err(PyValueError::new_err)
}

fn parse_precision(s: &str) -> PyResult<Precision> {
    match s {
        "f32" => Ok(Precision::F32),
        "bf16" => Ok(Precision::Bf16),
        _ => Err(PyValueError::new_err(format!(
            "precision must be \"f32\" or \"bf16\", got {s:?}"
        ))),
    }
}

/// A count from Python (a label, a step count, a batch size): ValueError when negative.
fn count(name: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| PyValueError::new_err(format!("{name} must be >= 0, got {v}")))
}

/// [`count`] of each value.
fn counts(name: &str, vs: &[i64]) -> PyResult<Vec<usize>> {
    vs.iter().map(|&v| count(name, v)).collect()
}

/// A Progressive Checkerboard model loaded on a device.
///
/// path: a model file from `checkergen convert` or `checkergen init`; None samples the
///     `tiny` preset with random weights (noise-like images, for tests and trying things).
/// device: "auto" (the first CUDA GPU if usable, else the CPU), "cpu", "cuda", "cuda:N",
///     or "emu" (the host-emulated CUDA device: development only, slow).
/// precision: how the CPU path stores the transformer's large linears: None or "f32" (the
///     reference), "bf16" (about half the bytes per step, f32 accumulation; as the CLI's
///     --precision bf16). A GPU always stores them in bf16: "f32" there is a ValueError.
///
/// One Model may be used from several threads at once; sampling and scoring release the GIL.
#[pyclass(module = "checkergen", frozen)]
struct Model {
    inner: Arc<checkergen::Model>,
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path=None, device="auto", precision=None))]
    fn new(
        py: Python<'_>,
        path: Option<PathBuf>,
        device: &str,
        precision: Option<&str>,
    ) -> PyResult<Model> {
        let device = parse_device(device)?;
        let precision = precision.map(parse_precision).transpose()?;
        let inner = py
            .detach(|| {
                let m = match path {
                    Some(p) => checkergen::Model::load(p, device),
                    None => checkergen::Model::tiny(device),
                }?;
                match precision {
                    Some(p) => m.with_precision(p),
                    None => Ok(m),
                }
            })
            .map_err(to_py)?;
        Ok(Model {
            inner: Arc::new(inner),
        })
    }

    /// Sample one image per label; returns a numpy.ndarray of dtype uint8 and shape
    /// (N, H, W, 3): RGB, channels last.
    ///
    /// labels: class ids, each in range(num_classes).
    /// cfg: classifier-free guidance strength (0 disables guidance).
    /// steps_per_scale: serial steps on every scale (ignored when `steps` is given).
    /// seed: random seed; image i depends only on (seed, i), not on batch_size.
    /// batch_size: images per batch (None: the device's default).
    /// steps: explicit serial steps per scale, smallest scale first.
    /// cfg_start_step: first serial step at which guidance applies.
    /// cfg_end_step: first serial step at which guidance no longer applies (None: to the end);
    ///     from it on the unconditional rows leave the batch, so the remaining steps cost half.
    /// temperature: 0 for greedy (argmax), > 0 to sample softmax(logits / temperature).
    /// top_k, top_p: keep the k most likely tokens / the most likely up to probability p.
    /// return_timings: also return where the call spent its time, as (images, timings) with
    ///     timings a dict: "step_ms" (a list, one value per serial step summed over batches;
    ///     empty when a batch ran as a CUDA graph without step timestamps), "prefill_ms",
    ///     "decode_ms", "batches", "replayed_batches". Milliseconds: device time on a GPU,
    ///     wall time on the CPU; on the emulator ("emu") they mean nothing.
    ///
    /// Raises ValueError for an invalid request, CheckergenError when sampling fails,
    /// KeyboardInterrupt on Ctrl-C (checked after every serial step).
    #[pyo3(signature = (labels, cfg=1.5, steps_per_scale=4, seed=0, batch_size=None, *,
                        steps=None, cfg_start_step=5, cfg_end_step=None, temperature=1.0, top_k=None, top_p=None,
                        return_timings=false))]
    #[allow(clippy::too_many_arguments)]
    fn sample<'py>(
        &self,
        py: Python<'py>,
        labels: Vec<i64>,
        cfg: f32,
        steps_per_scale: i64,
        seed: u64,
        batch_size: Option<i64>,
        steps: Option<Vec<i64>>,
        cfg_start_step: i64,
        cfg_end_step: Option<i64>,
        temperature: f32,
        top_k: Option<i64>,
        top_p: Option<f32>,
        return_timings: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut req = Request::new(counts("a label", &labels)?)
            .guidance(cfg)
            .cfg_start_step(count("cfg_start_step", cfg_start_step)?)
            .seed(seed);
        if let Some(e) = cfg_end_step {
            req = req.cfg_end_step(count("cfg_end_step", e)?);
        }
        req = match steps {
            Some(v) => req.steps(counts("steps", &v)?),
            None => req.steps_per_scale(count("steps_per_scale", steps_per_scale)?),
        };
        let mut policy = if temperature == 0.0 {
            Policy::greedy()
        } else if temperature.is_finite() && temperature > 0.0 {
            Policy::sample(temperature).map_err(to_py)?
        } else {
            return Err(PyValueError::new_err(format!(
                "temperature must be a finite number >= 0 (0: greedy argmax), got {temperature}"
            )));
        };
        if let Some(k) = top_k {
            policy = policy.top_k(count("top_k", k)?).map_err(to_py)?;
        }
        if let Some(p) = top_p {
            policy = policy.top_p(p).map_err(to_py)?;
        }
        req = req.policy(policy);
        if let Some(b) = batch_size {
            req = req.batch_size(count("batch_size", b)?);
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let req = req.cancel_flag(cancel.clone());
        let model = self.inner.clone();
        let images = py
            .detach(|| {
                model.sample_with_progress(&req, |_| {
                    // Ctrl-C: take the GIL for a moment after each step to look for signals.
                    if Python::attach(|py| py.check_signals()).is_err() {
                        cancel.store(true, Ordering::Relaxed);
                    }
                })
            })
            .map_err(to_py)?;
        let (n, s) = (images.len(), images.size());
        let t = images.timings().clone();
        let flat = PyArray1::from_vec(py, images.into_pixels());
        let array = flat.reshape([n, s, s, 3])?.into_any();
        if !return_timings {
            return Ok(array);
        }
        let d = PyDict::new(py);
        d.set_item("step_ms", t.step_ms)?;
        d.set_item("prefill_ms", t.prefill_ms)?;
        d.set_item("decode_ms", t.decode_ms)?;
        d.set_item("batches", t.batches)?;
        d.set_item("replayed_batches", t.replayed_batches)?;
        Ok(PyTuple::new(py, [array, d.into_any()])?.into_any())
    }

    /// Score real images (as `checkergen score`): the teacher-forced likelihood of each
    /// image's VQ codes under the model, at every value of steps_per_scale. Returns one dict
    /// per value, with the keys of the CLI's `score --json` lines: "steps_per_scale",
    /// "serial_steps", "images", "loss_total" and "bits_per_token" (mean cross-entropy per
    /// token in nats and bits), "loss_by_scale" and "top1_by_scale" (dicts keyed by the
    /// scale's side as a string).
    ///
    /// images: numpy.ndarray of dtype uint8 and shape (N, S, S, 3), RGB, channels last, C
    ///     contiguous, S = image_size (other sizes: center-crop and resize first, as the CLI
    ///     does).
    /// labels: one class id per image.
    /// steps_per_scale: the values to score at (the CLI's default 2, 4, 8).
    ///
    /// Needs a model file with the VQ encoder (`checkergen convert` keeps it, `checkergen
    /// init` writes it; the tiny preset has one). Raises ValueError for bad input,
    /// CheckergenError when scoring fails.
    #[pyo3(signature = (images, labels, steps_per_scale=vec![2, 4, 8]))]
    fn score<'py>(
        &self,
        py: Python<'py>,
        images: PyReadonlyArrayDyn<'py, u8>,
        labels: Vec<i64>,
        steps_per_scale: Vec<i64>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let side = self.inner.image_size();
        let shape = images.shape().to_vec();
        if shape.len() != 4 || shape[1] != side || shape[2] != side || shape[3] != 3 {
            return Err(PyValueError::new_err(format!(
                "images must have shape (N, {side}, {side}, 3), got {shape:?}"
            )));
        }
        if shape[0] != labels.len() {
            return Err(PyValueError::new_err(format!(
                "{} images but {} labels: give one label per image",
                shape[0],
                labels.len()
            )));
        }
        let labels = counts("a label", &labels)?;
        let steps = counts("steps_per_scale", &steps_per_scale)?;
        // A copy: Python threads may write to the array while the GIL is released.
        let rgb = images
            .as_slice()
            .map_err(|_| {
                PyValueError::new_err(
                    "images must be C-contiguous (numpy.ascontiguousarray(images))",
                )
            })?
            .to_vec();
        let model = self.inner.clone();
        let scores = py
            .detach(|| model.score(&rgb, &labels, &steps))
            .map_err(to_py)?;
        // The CLI's JSON objects, through Python's json module: the same keys and values.
        let loads = py.import("json")?.getattr("loads")?;
        scores
            .iter()
            .map(|s| loads.call1((s.to_json().to_string(),)))
            .collect()
    }

    /// Number of classes: labels are 0 .. num_classes - 1.
    #[getter]
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }

    /// Side of the sampled images in pixels.
    #[getter]
    fn image_size(&self) -> usize {
        self.inner.image_size()
    }

    /// Token grid sides per scale, ascending.
    #[getter]
    fn scale_sizes(&self) -> Vec<usize> {
        self.inner.scale_sizes().to_vec()
    }

    /// The device the model runs on, in words.
    #[getter]
    fn device(&self) -> String {
        self.inner.device().to_string()
    }

    /// How the transformer's large linears are stored: "f32" or "bf16" (always "bf16" on a
    /// GPU).
    #[getter]
    fn precision(&self) -> String {
        self.inner.precision().to_string()
    }

    fn __repr__(&self) -> String {
        format!(
            "checkergen.Model(device={:?}, num_classes={}, image_size={})",
            self.inner.device(),
            self.inner.num_classes(),
            self.inner.image_size()
        )
    }
}

/// The compiled part of the `checkergen` package.
#[pymodule]
fn _checkergen(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add("CheckergenError", m.py().get_type::<CheckergenError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
