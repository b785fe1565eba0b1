//! checkergen: a sampling engine for Progressive Checkerboard multiscale autoregressive image
//! models (Eigen, 2026). See README.md and ARCHITECTURE.md.

pub mod config;
pub mod convert;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod image;
pub mod init;
pub mod model;
pub mod order;
pub mod pth;
pub mod rng;
pub mod sampler;
pub mod sampling;
pub mod tensor;
pub mod weights;
pub mod yaml;
