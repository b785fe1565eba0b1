//! checkergen: a sampling engine for Progressive Checkerboard multiscale autoregressive image
//! models (Eigen, 2026), on the CPU (f32 reference) or a CUDA GPU.
//!
//! The API is small: load a [`Model`] on a [`Device`], describe a [`Request`] (labels,
//! guidance, steps, a token [`Policy`], seed, batch size), and sample it into [`Images`]
//! (8-bit RGB, channels last), optionally with a [`Progress`] callback and a cancellation
//! flag. Errors are an [`Error`] whose `source()` chain says what failed beneath.
//!
//! ```
//! use checkergen::{Device, Model, Request};
//! let model = Model::tiny(Device::Cpu)?; // random weights; `Model::load(path, device)` for a file
//! let images = model.sample(&Request::new(vec![1, 2, 3]).steps_per_scale(1).seed(0))?;
//! assert_eq!(images.pixels().len(), 3 * 256 * 256 * 3);
//! # Ok::<(), checkergen::Error>(())
//! ```
//!
//! The same engine is reachable from C (`include/checkergen.h`, the `cdylib`/`staticlib`)
//! and Python (`pip install .`); see README.md. A shared [`Model`] may sample from several
//! threads at once.
//!
//! The internal layers (bottom up: `math`, `rng`, `order`, `sampling`, `model`, `pipeline`,
//! `cpu`/`cuda`, `io`; ARCHITECTURE.md) stay reachable for the crate's own binary, tests and
//! benches, but are hidden from the documentation and carry no stability promise.

#![warn(missing_docs)]

mod api;
#[doc(hidden)]
pub mod capi;

pub use api::{Device, Error, Images, Model, Policy, Precision, Progress, Request, Result, Score};

#[doc(hidden)]
pub mod cpu;
#[cfg(feature = "cuda")]
#[doc(hidden)]
pub mod cuda;
#[doc(hidden)]
pub mod eval;
#[doc(hidden)]
pub mod flops;
#[doc(hidden)]
pub mod io;
#[doc(hidden)]
pub mod limits;
#[doc(hidden)]
pub mod math;
#[doc(hidden)]
pub mod model;
#[doc(hidden)]
pub mod order;
#[doc(hidden)]
pub mod paths;
#[doc(hidden)]
pub mod pipeline;
#[doc(hidden)]
pub mod rng;
#[doc(hidden)]
pub mod sampling;
