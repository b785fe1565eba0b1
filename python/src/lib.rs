//! `checkergen._checkergen`: the Python face of the Rust API (`checkergen::Model`). The
//! package `checkergen` (python/checkergen/__init__.py) re-exports it; the type stubs are
//! python/checkergen/__init__.pyi.

use checkergen::{Device, Error, Policy, Request};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::exceptions::{PyKeyboardInterrupt, PyValueError};
use pyo3::prelude::*;
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

/// A Progressive Checkerboard model loaded on a device.
///
/// path: a model file from `checkergen convert` or `checkergen init`; None samples the
///     `tiny` preset with random weights (noise-like images, for tests and trying things).
/// device: "auto" (the first CUDA GPU if usable, else the CPU), "cpu", "cuda", "cuda:N",
///     or "emu" (the host-emulated CUDA device: development only, slow).
///
/// One Model may be used from several threads at once; sampling releases the GIL.
#[pyclass(module = "checkergen", frozen)]
struct Model {
    inner: Arc<checkergen::Model>,
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path=None, device="auto"))]
    fn new(py: Python<'_>, path: Option<PathBuf>, device: &str) -> PyResult<Model> {
        let device = parse_device(device)?;
        let inner = py
            .detach(|| match path {
                Some(p) => checkergen::Model::load(p, device),
                None => checkergen::Model::tiny(device),
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
    /// temperature: 0 for greedy (argmax), > 0 to sample softmax(logits / temperature).
    /// top_k, top_p: keep the k most likely tokens / the most likely up to probability p.
    ///
    /// Raises ValueError for an invalid request, CheckergenError when sampling fails,
    /// KeyboardInterrupt on Ctrl-C (checked after every serial step).
    #[pyo3(signature = (labels, cfg=1.5, steps_per_scale=4, seed=0, batch_size=None, *,
                        steps=None, cfg_start_step=5, temperature=1.0, top_k=None, top_p=None))]
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
        temperature: f32,
        top_k: Option<i64>,
        top_p: Option<f32>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let count = |name: &str, v: i64| -> PyResult<usize> {
            usize::try_from(v)
                .map_err(|_| PyValueError::new_err(format!("{name} must be >= 0, got {v}")))
        };
        let labels: Vec<usize> = labels
            .iter()
            .map(|&l| count("a label", l))
            .collect::<PyResult<_>>()?;
        let mut req = Request::new(labels)
            .guidance(cfg)
            .cfg_start_step(count("cfg_start_step", cfg_start_step)?)
            .seed(seed);
        req = match steps {
            Some(v) => req.steps(
                v.iter()
                    .map(|&k| count("steps", k))
                    .collect::<PyResult<Vec<_>>>()?,
            ),
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
        let flat = PyArray1::from_vec(py, images.into_pixels());
        Ok(flat.reshape([n, s, s, 3])?.into_any())
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
