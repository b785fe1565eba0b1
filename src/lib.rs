//! checkergen: a sampling engine for Progressive Checkerboard multiscale autoregressive image
//! models (Eigen, 2026). See README.md and ARCHITECTURE.md.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod io;
pub mod model;
pub mod order;
pub mod rng;
pub mod sampler;
pub mod sampling;
