//! checkergen: a sampling engine for Progressive Checkerboard multiscale autoregressive image
//! models (Eigen, 2026). See README.md and ARCHITECTURE.md.
//!
//! Layers, bottom up (each depends only on those before it): `math`, `rng`, `order` (pure
//! schedule), `sampling` (token policy), `model` (definition, weights, files), `pipeline`
//! (the step loop and the `Backend` trait), `cpu` and `cuda` (backends, side by side), `io`
//! (checkpoint conversion, images).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod flops;
pub mod io;
pub mod limits;
pub mod math;
pub mod model;
pub mod order;
pub mod paths;
pub mod pipeline;
pub mod rng;
pub mod sampling;
